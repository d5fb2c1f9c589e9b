//! The agent's durable local state: one file that must survive SIGKILL and
//! power loss at any instant.
//!
//! It holds what the agent has promised the hub, so a restarted agent carries
//! on exactly where the killed one stopped:
//!
//! - the outpost's **identity** (its certificate and private key), written at
//!   join time;
//! - per stage, the newest **desired state** the hub sent and its revision,
//!   persisted *before* the agent acknowledges it (BRIEF §4, "Sync is
//!   level-triggered"), and the **applied revision**;
//! - the **outbox** of status reports not yet acknowledged by the hub.
//!
//! # Guarantees
//!
//! Every public method is one durable transaction: when it returns `Ok`, the
//! change is on disk (fsynced) and survives any crash; when the process dies
//! inside it, the file holds either all of the change or none of it. Nothing
//! here ever goes backwards:
//!
//! - a held desired revision is never replaced by an older or equal one;
//! - the applied revision never decreases;
//! - status sequence numbers strictly increase and are never reused, even
//!   after acknowledgements and restarts.
//!
//! The only way down is [`AgentState::forget_stage`], used when the hub deleted
//! the stage.
//!
//! # The bounded outbox
//!
//! While the link is down the outbox grows. It is capped at
//! [`StateOptions::outbox_capacity`] entries (default
//! [`DEFAULT_OUTBOX_CAPACITY`]). Status is level-triggered: each report states
//! the whole status of its stage, so an older report of a stage that has a
//! newer one in the outbox tells the hub nothing it will not learn from the
//! newer one. When an enqueue takes the outbox past its cap, the **oldest
//! superseded reports** (those whose stage has a newer report queued) are
//! dropped until it is back at the cap, and counted in
//! [`OutboxStats::dropped`]. The newest report of a stage is never dropped, so
//! if every queued report is the newest of its stage the outbox may exceed the
//! cap by up to one entry per stage (the hub's per-outpost stage limit bounds
//! that). Reports must therefore be complete states, never deltas. Dropping
//! leaves gaps in the sequence numbers the hub sees; they are expected.
//!
//! # Engine
//!
//! [redb](https://www.redb.org): pure Rust, ACID, copy-on-write B-trees with
//! checksummed commits. Commits use two-phase commit (two fsyncs) rather than
//! redb's default single fsync plus checksum, because status reports carry
//! text from workloads we do not control and 2PC is immune to the checksum
//! collision redb's design notes describe; the agent writes a few times a
//! second at most, so the extra fsync costs nothing that matters. The whole
//! file is integrity-checked on every open, so a damaged file is refused with
//! an error instead of being trusted.
//!
//! The API is synchronous (redb is); async callers use `spawn_blocking`.

use std::fmt;
use std::fs;
use std::io;
use std::ops::Bound;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use redb::{
    Builder, Database, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition, TableHandle, WriteTransaction,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The schema version this build writes. A file carrying a higher one was
/// written by a newer agent and is refused rather than misread.
pub const SCHEMA_VERSION: u64 = 1;

/// How many status reports the outbox holds before it starts coalescing.
pub const DEFAULT_OUTBOX_CAPACITY: usize = 10_000;

// === tables ===
//
// Keys of stage tables are `(project, stage)`. JSON documents are stored as
// serialized bytes: the agent interprets them, this module only keeps them.

/// Bookkeeping counters: schema version, last assigned status seq, dropped.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// The outpost identity as one JSON document under [`IDENTITY_KEY`].
const IDENTITY: TableDefinition<&str, &[u8]> = TableDefinition::new("identity");
/// `(project, stage) -> (desired revision, desired state JSON)`, sealed
/// with the key in [`STATE_KEY_FILE`] (it carries the release's config
/// values); states written before sealing are read as they are.
const DESIRED: TableDefinition<(&str, &str), (u64, &[u8])> = TableDefinition::new("desired");
/// `(project, stage) -> (applied revision, applied ok)`.
const APPLIED: TableDefinition<(&str, &str), (u64, bool)> = TableDefinition::new("applied");
/// `seq -> (project, stage, report JSON)`, oldest first.
const OUTBOX: TableDefinition<u64, (&str, &str, &[u8])> = TableDefinition::new("outbox");
/// `(project, stage) -> seq` of that stage's newest queued report; what makes
/// "is this report superseded?" one lookup when coalescing.
const OUTBOX_NEWEST: TableDefinition<(&str, &str), u64> = TableDefinition::new("outbox_newest");

/// The file beside the state file holding the key desired states are
/// sealed with (see [`crate::seal`]); back it up with the state file.
pub const STATE_KEY_FILE: &str = "state.key";

const META_SCHEMA_VERSION: &str = "schema_version";
const META_LAST_SEQ: &str = "last_seq";
const META_DROPPED: &str = "dropped";
const IDENTITY_KEY: &str = "identity";

// === public types ===

/// Who the outpost is, written once at join time (and again when the
/// certificate is renewed).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The outpost's name on the hub.
    pub outpost: String,
    /// The hub's base URL, e.g. `https://hub.example:7443`.
    pub hub_url: String,
    /// The hub CA the link is pinned to (PEM).
    pub ca_cert_pem: String,
    /// The agent's client certificate (PEM).
    pub cert_pem: String,
    /// The agent's private key (PEM). Never leaves the host; never logged.
    pub key_pem: String,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Debug output ends up in logs and panics; the key must not.
        f.debug_struct("Identity")
            .field("outpost", &self.outpost)
            .field("hub_url", &self.hub_url)
            .field("ca_cert_pem", &self.ca_cert_pem)
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A stage, named as the hub names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct StageKey {
    pub project: String,
    pub stage: String,
}

impl StageKey {
    pub fn new(project: impl Into<String>, stage: impl Into<String>) -> Self {
        StageKey {
            project: project.into(),
            stage: stage.into(),
        }
    }

    fn as_key(&self) -> (&str, &str) {
        (&self.project, &self.stage)
    }
}

impl fmt::Display for StageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.project, self.stage)
    }
}

/// What [`AgentState::store_desired`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    /// The revision is newer than anything held and is now persisted.
    Stored,
    /// Exactly this revision was already held (the hub re-sent it, e.g. after
    /// a lost acknowledgement). Nothing changed; acknowledge it again.
    AlreadyHeld,
    /// A newer revision is held; the offered one was refused.
    Stale { held: u64 },
}

impl StoreOutcome {
    /// True when the offered revision is persisted (now or before), i.e. the
    /// agent may acknowledge it to the hub.
    pub fn is_held(self) -> bool {
        matches!(self, StoreOutcome::Stored | StoreOutcome::AlreadyHeld)
    }
}

/// One stage the agent holds desired state for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageRecord {
    pub key: StageKey,
    /// The newest desired revision persisted.
    pub desired_revision: u64,
    /// The revision last recorded as applied, if any.
    pub applied_revision: Option<u64>,
    /// Whether that apply succeeded (false when none is recorded).
    pub applied_ok: bool,
}

/// The outbox at a glance, e.g. for the `hello` frame and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxStats {
    /// Reports waiting for the hub's acknowledgement.
    pub len: u64,
    /// The configured cap (see the module docs for when it may be exceeded).
    pub capacity: usize,
    /// Superseded reports dropped to keep the outbox bounded, since the file
    /// was created.
    pub dropped: u64,
    /// The last sequence number assigned (0: none yet).
    pub last_seq: u64,
    /// The sequence number of the oldest queued report, if any.
    pub oldest_seq: Option<u64>,
}

/// Tuning for [`AgentState::open_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateOptions {
    /// Outbox cap in entries; values below 1 are treated as 1.
    pub outbox_capacity: usize,
}

impl Default for StateOptions {
    fn default() -> Self {
        StateOptions {
            outbox_capacity: DEFAULT_OUTBOX_CAPACITY,
        }
    }
}

/// What went wrong, on which file, and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "could not {action} the agent state file {path}: {source}; check that its directory \
         exists, that the agent's user may write there, and that the disk is not full",
        path = .path.display()
    )]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },

    #[error(
        "the agent state file {path} is damaged or is not an agent state file ({detail}); move it \
         aside (e.g. `mv {path} {path}.broken`) and start the agent again: it re-fetches the \
         desired state of every stage from the hub on the next connect. The outpost's identity \
         was kept in that file too, so the agent must join again (`trellis agent join`, with a \
         new token from an admin)",
        path = .path.display()
    )]
    Damaged { path: PathBuf, detail: String },

    #[error(
        "the agent state file {path} is in use by another process (is another agent running on \
         this host?); stop that agent first, or give this one its own state file",
        path = .path.display()
    )]
    InUse { path: PathBuf },

    #[error(
        "the agent state file {path} was written by a newer agent (state schema v{found}; this \
         agent understands up to v{supported}); run the newer agent, or upgrade this one. Do not \
         delete the file: it holds the outpost's identity",
        path = .path.display()
    )]
    NewerSchema {
        path: PathBuf,
        found: u64,
        supported: u64,
    },

    #[error(
        "could not {action} in the agent state file {path}: {source}; the last completed change \
         is kept. Check the disk (free space, I/O errors in the kernel log) and restart the agent",
        path = .path.display()
    )]
    Storage {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: Box<redb::Error>,
    },

    #[error(
        "revision 0 of stage {stage} cannot be stored or applied: revisions start at 1 (0 means \
         \"none\" on the link); this is a bug in the hub or the agent"
    )]
    ZeroRevision { stage: StageKey },

    #[error(
        "cannot record revision {revision} of stage {stage} as applied: no desired state is held \
         for that stage (never stored, or forgotten); store it with the desired state first"
    )]
    UnknownStage { stage: StageKey, revision: u64 },

    #[error(
        "cannot record revision {revision} of stage {stage} as applied: only revision {desired} \
         is held, and a revision that was never persisted cannot have been applied; this is a bug \
         in the agent"
    )]
    AppliedAheadOfDesired {
        stage: StageKey,
        revision: u64,
        desired: u64,
    },

    #[error(
        "refusing to record revision {revision} of stage {stage} as applied: revision {applied} \
         is already applied, and applying an older revision after a newer one would run the stage \
         backwards; apply the newest desired revision instead"
    )]
    OutOfOrderApply {
        stage: StageKey,
        revision: u64,
        applied: u64,
    },

    #[error("could not encode {what} as JSON for the agent state file: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

pub type Result<T, E = StateError> = std::result::Result<T, E>;

// === AgentState ===

/// The agent's durable state; see the module docs. Cheap to share behind an
/// `Arc`: redb serialises writers internally and readers never block.
pub struct AgentState {
    db: Database,
    path: PathBuf,
    outbox_capacity: usize,
    seal: std::sync::Arc<crate::seal::SealKey>,
}

impl fmt::Debug for AgentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentState")
            .field("path", &self.path)
            .field("outbox_capacity", &self.outbox_capacity)
            .finish_non_exhaustive()
    }
}

impl AgentState {
    /// Opens the state file at `path` with default options, creating it if
    /// missing. Refuses a damaged file, one that is not an agent state file,
    /// and one written by a newer schema version.
    pub fn open(path: &Path) -> Result<AgentState> {
        AgentState::open_with(path, StateOptions::default())
    }

    /// [`AgentState::open`] with explicit options.
    pub fn open_with(path: &Path, options: StateOptions) -> Result<AgentState> {
        let path = path.to_path_buf();
        let exists = path.try_exists().map_err(|source| StateError::Io {
            path: path.clone(),
            action: "look for",
            source,
        })?;
        if !exists {
            create_file(&path)?;
        }
        let db = open_database(&path, false)?;
        let key_path = path.with_file_name(STATE_KEY_FILE);
        let seal =
            crate::seal::SealKey::load_or_create(&key_path).map_err(|source| StateError::Io {
                path: key_path.clone(),
                action: "read or create",
                source,
            })?;
        let state = AgentState {
            db,
            path,
            outbox_capacity: options.outbox_capacity.max(1),
            seal: std::sync::Arc::new(seal),
        };
        state.check_schema()?;
        Ok(state)
    }

    /// The file this state lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The key desired states are sealed with, for what else keeps config
    /// values on disk (the deployer's plans).
    pub fn seal_key(&self) -> std::sync::Arc<crate::seal::SealKey> {
        self.seal.clone()
    }

    // --- identity ---

    /// The identity written at join time, if the agent has joined.
    pub fn identity(&self) -> Result<Option<Identity>> {
        let txn = self.begin_read()?;
        let table = txn
            .open_table(IDENTITY)
            .ctx(self, "open the identity table")?;
        let Some(guard) = table.get(IDENTITY_KEY).ctx(self, "read the identity")? else {
            return Ok(None);
        };
        self.decode(guard.value(), "the identity").map(Some)
    }

    /// Replaces the identity (join, certificate renewal).
    pub fn set_identity(&self, id: &Identity) -> Result<()> {
        let bytes = serde_json::to_vec(id).map_err(|source| StateError::Encode {
            what: "the identity",
            source,
        })?;
        let txn = self.begin_write()?;
        {
            let mut table = txn
                .open_table(IDENTITY)
                .ctx(self, "open the identity table")?;
            table
                .insert(IDENTITY_KEY, bytes.as_slice())
                .ctx(self, "write the identity")?;
        }
        self.commit(txn, "save the identity")
    }

    // --- desired and applied state ---

    /// Persists the desired state of `stage` at `revision`, unless a newer or
    /// equal revision is already held. Only after `Ok(outcome)` with
    /// [`StoreOutcome::is_held`] may the agent acknowledge the revision.
    pub fn store_desired(
        &self,
        stage: &StageKey,
        revision: u64,
        state: &Value,
    ) -> Result<StoreOutcome> {
        if revision == 0 {
            return Err(StateError::ZeroRevision {
                stage: stage.clone(),
            });
        }
        let bytes = crate::seal::seal_marked(
            &self.seal,
            &encode_value(state, "the desired state")?,
            &desired_aad(stage),
        );
        let txn = self.begin_write()?;
        let outcome = {
            let mut table = txn
                .open_table(DESIRED)
                .ctx(self, "open the desired-state table")?;
            let held = table
                .get(stage.as_key())
                .ctx(self, "read the desired state")?
                .map(|guard| {
                    let (held, held_bytes) = guard.value();
                    // Sealing uses a fresh nonce each time: compare what
                    // the bytes hold.
                    let same = self
                        .open_desired(stage, held_bytes)
                        .is_ok_and(|held_state| &held_state == state);
                    (held, same)
                });
            match held {
                Some((held, _)) if held > revision => StoreOutcome::Stale { held },
                Some((held, same)) if held == revision => {
                    if !same {
                        // The hub promises one state per revision; keep what
                        // was acknowledged, but make the anomaly visible.
                        tracing::warn!(
                            %stage, revision,
                            "hub re-sent a held desired revision with different content; keeping the held one"
                        );
                    }
                    StoreOutcome::AlreadyHeld
                }
                _ => {
                    table
                        .insert(stage.as_key(), (revision, bytes.as_slice()))
                        .ctx(self, "write the desired state")?;
                    StoreOutcome::Stored
                }
            }
        };
        if outcome == StoreOutcome::Stored {
            self.commit(txn, "save the desired state")?;
        } else {
            // Nothing changed: skip the fsyncs of an empty commit.
            txn.abort().ctx(self, "end a read of the desired state")?;
        }
        Ok(outcome)
    }

    /// The desired revision and state held for `stage`.
    pub fn desired(&self, stage: &StageKey) -> Result<Option<(u64, Value)>> {
        let txn = self.begin_read()?;
        let table = txn
            .open_table(DESIRED)
            .ctx(self, "open the desired-state table")?;
        let Some(guard) = table
            .get(stage.as_key())
            .ctx(self, "read the desired state")?
        else {
            return Ok(None);
        };
        let (revision, bytes) = guard.value();
        Ok(Some((revision, self.open_desired(stage, bytes)?)))
    }

    /// A stored desired state, opened and decoded.
    fn open_desired(&self, stage: &StageKey, bytes: &[u8]) -> Result<Value> {
        let plain =
            crate::seal::open_marked(&self.seal, bytes, &desired_aad(stage)).map_err(|e| {
                StateError::Damaged {
                    path: self.path.clone(),
                    detail: format!(
                        "the desired state of stage {stage}: {e} ({})",
                        self.path.with_file_name(STATE_KEY_FILE).display()
                    ),
                }
            })?;
        self.decode(&plain, "a desired state")
    }

    /// Drops everything held for `stage` (the hub deleted it), so its
    /// revisions may start over. Queued status reports of the stage stay in
    /// the outbox: the hub still wants to hear the last of it. Returns
    /// whether anything was held.
    pub fn forget_stage(&self, stage: &StageKey) -> Result<bool> {
        let txn = self.begin_write()?;
        let found = {
            let mut desired = txn
                .open_table(DESIRED)
                .ctx(self, "open the desired-state table")?;
            let mut applied = txn
                .open_table(APPLIED)
                .ctx(self, "open the applied-state table")?;
            let had_desired = desired
                .remove(stage.as_key())
                .ctx(self, "remove the desired state")?
                .is_some();
            let had_applied = applied
                .remove(stage.as_key())
                .ctx(self, "remove the applied state")?
                .is_some();
            had_desired || had_applied
        };
        self.commit(txn, "forget the stage")?;
        Ok(found)
    }

    /// Every stage with desired state held, ordered by project then stage.
    pub fn stages(&self) -> Result<Vec<StageRecord>> {
        let txn = self.begin_read()?;
        let desired = txn
            .open_table(DESIRED)
            .ctx(self, "open the desired-state table")?;
        let applied = txn
            .open_table(APPLIED)
            .ctx(self, "open the applied-state table")?;
        let mut records = Vec::new();
        for entry in desired.iter().ctx(self, "list the stages")? {
            let (key, value) = entry.ctx(self, "list the stages")?;
            let (project, stage) = key.value();
            let (desired_revision, _) = value.value();
            let applied = applied
                .get((project, stage))
                .ctx(self, "read the applied state")?
                .map(|guard| guard.value());
            records.push(StageRecord {
                key: StageKey::new(project, stage),
                desired_revision,
                applied_revision: applied.map(|(revision, _)| revision),
                applied_ok: applied.is_some_and(|(_, ok)| ok),
            });
        }
        Ok(records)
    }

    /// Records that `revision` of `stage` was applied, successfully or not.
    /// Recording the applied revision again (e.g. a retry that now succeeded)
    /// is fine; recording an older one is [`StateError::OutOfOrderApply`], and
    /// one newer than the held desired revision is
    /// [`StateError::AppliedAheadOfDesired`].
    pub fn record_applied(&self, stage: &StageKey, revision: u64, ok: bool) -> Result<()> {
        let txn = self.begin_write()?;
        self.applied_in(&txn, stage, revision, ok)?;
        self.commit(txn, "save the applied revision")
    }

    /// [`AgentState::record_applied`] and [`AgentState::enqueue_status`] of
    /// its report in one commit: the applied revision and the report that
    /// tells the hub are kept together or not at all, and an apply costs
    /// one write instead of two. Nothing is queued if recording fails.
    pub fn record_applied_and_report(
        &self,
        stage: &StageKey,
        revision: u64,
        ok: bool,
        report: &Value,
    ) -> Result<u64> {
        let bytes = encode_value(report, "a status report")?;
        let txn = self.begin_write()?;
        self.applied_in(&txn, stage, revision, ok)?;
        let seq = self.enqueue_in(&txn, stage, &bytes)?;
        self.commit(txn, "save the applied revision and its report")?;
        Ok(seq)
    }

    /// [`AgentState::record_applied`]'s checks and write, in `txn`.
    fn applied_in(
        &self,
        txn: &WriteTransaction,
        stage: &StageKey,
        revision: u64,
        ok: bool,
    ) -> Result<()> {
        if revision == 0 {
            return Err(StateError::ZeroRevision {
                stage: stage.clone(),
            });
        }
        {
            let desired = txn
                .open_table(DESIRED)
                .ctx(self, "open the desired-state table")?;
            let mut applied = txn
                .open_table(APPLIED)
                .ctx(self, "open the applied-state table")?;
            let Some(held) = desired
                .get(stage.as_key())
                .ctx(self, "read the desired state")?
                .map(|guard| guard.value().0)
            else {
                return Err(StateError::UnknownStage {
                    stage: stage.clone(),
                    revision,
                });
            };
            if revision > held {
                return Err(StateError::AppliedAheadOfDesired {
                    stage: stage.clone(),
                    revision,
                    desired: held,
                });
            }
            let current = applied
                .get(stage.as_key())
                .ctx(self, "read the applied state")?
                .map(|guard| guard.value().0);
            if let Some(current) = current
                && revision < current
            {
                return Err(StateError::OutOfOrderApply {
                    stage: stage.clone(),
                    revision,
                    applied: current,
                });
            }
            applied
                .insert(stage.as_key(), (revision, ok))
                .ctx(self, "write the applied state")?;
        }
        Ok(())
    }

    // --- status outbox ---

    /// Queues a status report of `stage` and returns its sequence number,
    /// which is greater than every number assigned before, in this process or
    /// any earlier one. May drop older superseded reports to stay within the
    /// cap (see the module docs). `report` must be the stage's whole status.
    pub fn enqueue_status(&self, stage: &StageKey, report: &Value) -> Result<u64> {
        let bytes = encode_value(report, "a status report")?;
        let txn = self.begin_write()?;
        let seq = self.enqueue_in(&txn, stage, &bytes)?;
        self.commit(txn, "queue the status report")?;
        Ok(seq)
    }

    /// [`AgentState::enqueue_status`]'s write of an encoded report, in `txn`.
    fn enqueue_in(&self, txn: &WriteTransaction, stage: &StageKey, bytes: &[u8]) -> Result<u64> {
        let seq = {
            let mut meta = txn.open_table(META).ctx(self, "open the meta table")?;
            let mut outbox = txn.open_table(OUTBOX).ctx(self, "open the outbox")?;
            let mut newest = txn
                .open_table(OUTBOX_NEWEST)
                .ctx(self, "open the outbox index")?;

            let last = self.meta_counter(&meta, META_LAST_SEQ)?;
            let seq = last.checked_add(1).ok_or_else(|| StateError::Damaged {
                path: self.path.clone(),
                detail: "the status sequence number is at its maximum".into(),
            })?;
            outbox
                .insert(seq, (stage.project.as_str(), stage.stage.as_str(), bytes))
                .ctx(self, "queue the status report")?;
            newest
                .insert(stage.as_key(), seq)
                .ctx(self, "index the status report")?;
            meta.insert(META_LAST_SEQ, seq)
                .ctx(self, "advance the status sequence")?;

            let len = outbox.len().ctx(self, "count the outbox")?;
            let excess = usize::try_from(len)
                .unwrap_or(usize::MAX)
                .saturating_sub(self.outbox_capacity);
            if excess > 0 {
                let dropped = self.coalesce(&mut outbox, &newest, excess)?;
                if dropped > 0 {
                    let total = self.meta_counter(&meta, META_DROPPED)?;
                    meta.insert(META_DROPPED, total.saturating_add(dropped as u64))
                        .ctx(self, "count dropped status reports")?;
                }
                if dropped < excess {
                    tracing::warn!(
                        len,
                        capacity = self.outbox_capacity,
                        "status outbox is over its cap: every queued report is the newest of its stage"
                    );
                }
            }
            seq
        };
        Ok(seq)
    }

    /// Up to `limit` queued reports with a sequence number greater than
    /// `after`, oldest first.
    pub fn pending_status(&self, after: u64, limit: usize) -> Result<Vec<(u64, Value)>> {
        let txn = self.begin_read()?;
        let outbox = txn.open_table(OUTBOX).ctx(self, "open the outbox")?;
        let mut pending = Vec::new();
        if limit == 0 {
            return Ok(pending);
        }
        let range = outbox
            .range::<u64>((Bound::Excluded(after), Bound::Unbounded))
            .ctx(self, "read the outbox")?;
        for entry in range {
            let (seq, value) = entry.ctx(self, "read the outbox")?;
            let (_, _, bytes) = value.value();
            pending.push((seq.value(), self.decode(bytes, "a status report")?));
            if pending.len() >= limit {
                break;
            }
        }
        Ok(pending)
    }

    /// The hub stored every report up to and including `up_to_seq`: drop them.
    /// An acknowledgement beyond the last assigned number is clamped to it (it
    /// must not pre-acknowledge reports not yet written); an older one than a
    /// previous acknowledgement removes nothing. Returns how many were removed.
    pub fn ack_status(&self, up_to_seq: u64) -> Result<usize> {
        let mut txn = self.begin_write()?;
        // Not synced on its own: it reaches the disk with the next durable
        // commit (or the file's close). Lost in a crash, the removal only
        // makes the agent send those reports again, which the hub takes as
        // it takes any report it already has (a resent report is what a
        // lost `status-ack` gives too). Every delivery ends in one of these,
        // so it saves a third of the agent's syncs, and of a device's flash
        // writes, per release.
        txn.set_durability(redb::Durability::None)
            .ctx(self, "start a write")?;
        let removed = {
            let meta = txn.open_table(META).ctx(self, "open the meta table")?;
            let mut outbox = txn.open_table(OUTBOX).ctx(self, "open the outbox")?;
            let mut newest = txn
                .open_table(OUTBOX_NEWEST)
                .ctx(self, "open the outbox index")?;
            let up_to = up_to_seq.min(self.meta_counter(&meta, META_LAST_SEQ)?);

            let mut acked: Vec<(u64, StageKey)> = Vec::new();
            for entry in outbox.range(..=up_to).ctx(self, "read the outbox")? {
                let (seq, value) = entry.ctx(self, "read the outbox")?;
                let (project, stage, _) = value.value();
                acked.push((seq.value(), StageKey::new(project, stage)));
            }
            for (seq, stage) in &acked {
                outbox
                    .remove(*seq)
                    .ctx(self, "remove an acknowledged report")?;
                // Acks are a prefix, so once a stage's newest report is
                // acknowledged, none of its reports is left queued.
                let is_newest = newest
                    .get(stage.as_key())
                    .ctx(self, "read the outbox index")?
                    .is_some_and(|guard| guard.value() == *seq);
                if is_newest {
                    newest
                        .remove(stage.as_key())
                        .ctx(self, "update the outbox index")?;
                }
            }
            acked.len()
        };
        if removed == 0 {
            txn.abort().ctx(self, "end a read of the outbox")?;
        } else {
            self.commit(txn, "remove acknowledged status reports")?;
        }
        Ok(removed)
    }

    /// How many reports wait for acknowledgement.
    pub fn outbox_len(&self) -> Result<u64> {
        let txn = self.begin_read()?;
        let outbox = txn.open_table(OUTBOX).ctx(self, "open the outbox")?;
        outbox.len().ctx(self, "count the outbox")
    }

    /// Size, cap, dropped count and sequence bounds of the outbox.
    pub fn outbox_stats(&self) -> Result<OutboxStats> {
        let txn = self.begin_read()?;
        let meta = txn.open_table(META).ctx(self, "open the meta table")?;
        let outbox = txn.open_table(OUTBOX).ctx(self, "open the outbox")?;
        let oldest_seq = outbox
            .first()
            .ctx(self, "read the outbox")?
            .map(|(seq, _)| seq.value());
        Ok(OutboxStats {
            len: outbox.len().ctx(self, "count the outbox")?,
            capacity: self.outbox_capacity,
            dropped: self.meta_counter(&meta, META_DROPPED)?,
            last_seq: self.meta_counter(&meta, META_LAST_SEQ)?,
            oldest_seq,
        })
    }

    // === internals ===

    /// Removes up to `excess` of the oldest superseded reports; returns how
    /// many it removed.
    fn coalesce(
        &self,
        outbox: &mut redb::Table<'_, u64, (&str, &str, &[u8])>,
        newest: &redb::Table<'_, (&str, &str), u64>,
        excess: usize,
    ) -> Result<usize> {
        let mut victims = Vec::with_capacity(excess);
        for entry in outbox.iter().ctx(self, "read the outbox")? {
            let (seq, value) = entry.ctx(self, "read the outbox")?;
            let seq = seq.value();
            let (project, stage, _) = value.value();
            let newest_of_stage = newest
                .get((project, stage))
                .ctx(self, "read the outbox index")?
                .map(|guard| guard.value());
            if newest_of_stage != Some(seq) {
                victims.push(seq);
                if victims.len() == excess {
                    break;
                }
            }
        }
        for seq in &victims {
            outbox
                .remove(*seq)
                .ctx(self, "drop a superseded status report")?;
        }
        Ok(victims.len())
    }

    fn meta_counter<T: ReadableTable<&'static str, u64>>(
        &self,
        meta: &T,
        key: &str,
    ) -> Result<u64> {
        let value = meta.get(key).ctx(self, "read the meta table")?;
        value
            .map(|guard| guard.value())
            .ok_or_else(|| StateError::Damaged {
                path: self.path.clone(),
                detail: format!("the `{key}` counter is missing"),
            })
    }

    /// Refuses files of a newer schema and files that are not ours, and makes
    /// sure every table exists with the types this build expects.
    fn check_schema(&self) -> Result<()> {
        let txn = self.begin_read()?;
        let has_meta = txn
            .list_tables()
            .ctx(self, "list the tables")?
            .any(|table| table.name() == META.name());
        if !has_meta {
            return Err(StateError::Damaged {
                path: self.path.clone(),
                detail: "it holds no Trellis agent schema".into(),
            });
        }
        let meta = txn.open_table(META).ctx(self, "open the meta table")?;
        let found = self.meta_counter(&meta, META_SCHEMA_VERSION)?;
        if found > SCHEMA_VERSION {
            return Err(StateError::NewerSchema {
                path: self.path.clone(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
        if found < SCHEMA_VERSION {
            // No older schema was ever released; when one is superseded, its
            // migration goes here.
            return Err(StateError::Damaged {
                path: self.path.clone(),
                detail: format!("unknown state schema version {found}"),
            });
        }
        self.meta_counter(&meta, META_LAST_SEQ)?;
        self.meta_counter(&meta, META_DROPPED)?;
        // Opening checks the stored key and value types against ours.
        txn.open_table(IDENTITY)
            .ctx(self, "check the identity table")?;
        txn.open_table(DESIRED)
            .ctx(self, "check the desired-state table")?;
        txn.open_table(APPLIED)
            .ctx(self, "check the applied-state table")?;
        txn.open_table(OUTBOX).ctx(self, "check the outbox")?;
        txn.open_table(OUTBOX_NEWEST)
            .ctx(self, "check the outbox index")?;
        Ok(())
    }

    fn begin_read(&self) -> Result<ReadTransaction> {
        self.db.begin_read().ctx(self, "start a read")
    }

    fn begin_write(&self) -> Result<WriteTransaction> {
        let mut txn = self.db.begin_write().ctx(self, "start a write")?;
        // See the module docs ("Engine") for why two-phase.
        txn.set_two_phase_commit(true);
        Ok(txn)
    }

    fn commit(&self, txn: WriteTransaction, action: &'static str) -> Result<()> {
        txn.commit().ctx(self, action)
    }

    fn decode<T: serde::de::DeserializeOwned>(&self, bytes: &[u8], what: &str) -> Result<T> {
        serde_json::from_slice(bytes).map_err(|err| StateError::Damaged {
            path: self.path.clone(),
            detail: format!("{what} in it is not valid JSON: {err}"),
        })
    }
}

/// What a stage's sealed desired state is bound to.
fn desired_aad(stage: &StageKey) -> Vec<u8> {
    format!("desired:{stage}").into_bytes()
}

fn encode_value(value: &Value, what: &'static str) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|source| StateError::Encode { what, source })
}

/// Creates a fresh state file so that `path` holds either nothing or a fully
/// initialised file, whenever the process dies: build it under a temporary
/// name, then rename it into place and make the rename durable.
fn create_file(path: &Path) -> Result<()> {
    let io_err = |action: &'static str| {
        move |source: io::Error| StateError::Io {
            path: path.to_path_buf(),
            action,
            source,
        }
    };
    let Some(file_name) = path.file_name() else {
        return Err(io_err("create")(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the path names a directory, not a file",
        )));
    };
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(".creating");
    let tmp = path.with_file_name(tmp_name);

    // A leftover from a creation that died half-way holds nothing anyone
    // relied on (it was never renamed into place).
    match fs::remove_file(&tmp) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(io_err("create")(err)),
        _ => {}
    }
    {
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            // It holds the outpost's private key.
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        options.open(&tmp).map_err(io_err("create"))?;
    }

    let db = open_database(&tmp, true).map_err(|err| rename_path(err, path))?;
    let init = (|| -> Result<(), redb::Error> {
        let mut txn = db.begin_write()?;
        txn.set_two_phase_commit(true);
        {
            let mut meta = txn.open_table(META)?;
            meta.insert(META_SCHEMA_VERSION, SCHEMA_VERSION)?;
            meta.insert(META_LAST_SEQ, 0)?;
            meta.insert(META_DROPPED, 0)?;
            txn.open_table(IDENTITY)?;
            txn.open_table(DESIRED)?;
            txn.open_table(APPLIED)?;
            txn.open_table(OUTBOX)?;
            txn.open_table(OUTBOX_NEWEST)?;
        }
        txn.commit()?;
        db.close()?;
        Ok(())
    })();
    init.map_err(|err| storage_error(path, "initialise", err))?;

    fs::rename(&tmp, path).map_err(io_err("create"))?;
    sync_parent_dir(path).map_err(io_err("create"))?;
    Ok(())
}

/// A new directory entry is only durable once its directory is fsynced.
fn sync_parent_dir(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        let parent = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        fs::File::open(parent)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Errors about the temporary file of [`create_file`] name the real path,
/// which is the one the operator knows.
fn rename_path(err: StateError, path: &Path) -> StateError {
    match err {
        StateError::Io { action, source, .. } => StateError::Io {
            path: path.to_path_buf(),
            action,
            source,
        },
        StateError::Damaged { detail, .. } => StateError::Damaged {
            path: path.to_path_buf(),
            detail,
        },
        StateError::Storage { action, source, .. } => StateError::Storage {
            path: path.to_path_buf(),
            action,
            source,
        },
        other => other,
    }
}

fn open_database(path: &Path, create: bool) -> Result<Database> {
    let mut builder = Builder::new();
    // Verify every page's checksum on open: a file altered or damaged outside
    // redb is refused with an error, where a plain open may trust (or, in
    // debug builds, panic on) what it reads. The file is small, so this is
    // cheap.
    builder.set_check_integrity_on_open(true);
    // Belt and braces for hostile files: no byte pattern on disk may take the
    // agent down with a panic instead of a clear error.
    let opened = panic::catch_unwind(AssertUnwindSafe(|| {
        if create {
            builder.create(path)
        } else {
            builder.open(path)
        }
    }));
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(err)) => Err(storage_error(path, "open", err.into())),
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown failure".into());
            Err(StateError::Damaged {
                path: path.to_path_buf(),
                detail: format!("the storage engine could not read it: {message}"),
            })
        }
    }
}

/// Sorts a redb error into what the operator should do about it.
fn storage_error(path: &Path, action: &'static str, err: redb::Error) -> StateError {
    let path = path.to_path_buf();
    match err {
        redb::Error::DatabaseAlreadyOpen | redb::Error::LockProtocolMismatch => {
            StateError::InUse { path }
        }
        redb::Error::Corrupted(detail) => StateError::Damaged { path, detail },
        redb::Error::RepairAborted => StateError::Damaged {
            path,
            detail: "it needs a repair that could not be completed".into(),
        },
        redb::Error::UpgradeRequired(version) => StateError::Damaged {
            path,
            detail: format!("it uses the old storage format {version}"),
        },
        redb::Error::TableTypeMismatch { .. }
        | redb::Error::TableDoesNotExist(_)
        | redb::Error::TypeDefinitionChanged { .. }
        | redb::Error::TableIsMultimap(_)
        | redb::Error::TableIsNotMultimap(_) => StateError::Damaged {
            path,
            detail: format!("its tables are not the agent's: {err}"),
        },
        // A short or garbled file shows up as a read past its end or as
        // invalid data, not as an environment problem.
        redb::Error::Io(source)
            if matches!(
                source.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidData
            ) =>
        {
            StateError::Damaged {
                path,
                detail: source.to_string(),
            }
        }
        redb::Error::Io(source) => StateError::Io {
            path,
            action,
            source,
        },
        other => StateError::Storage {
            path,
            action,
            source: Box::new(other),
        },
    }
}

/// Attaches the file and the action to a redb error.
trait Context<T> {
    fn ctx(self, state: &AgentState, action: &'static str) -> Result<T>;
}

impl<T, E: Into<redb::Error>> Context<T> for std::result::Result<T, E> {
    fn ctx(self, state: &AgentState, action: &'static str) -> Result<T> {
        self.map_err(|err| storage_error(&state.path, action, err.into()))
    }
}
