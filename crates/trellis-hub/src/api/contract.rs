//! The API's contract: the OpenAPI document as clients get it.
//!
//! utoipa derives operations, parameters and bodies from the handlers
//! (`#[utoipa::path]`, the route list in `api/mod.rs`); this module adds
//! what is the same for many operations and would only drift if repeated
//! on each: the security schemes (an access key as a bearer token; the
//! agent's client certificate for the `/agent/…` endpoints), and every
//! error an operation can answer — its status and the stable codes its
//! `{"error": {code, message, hint}}` body can carry, as an `enum`, so a
//! client (or a fuzzer checking responses against the document) knows the
//! full set.
//!
//! [`ERRORS`] lists each operation's own refusals; [`complete`] adds what
//! follows from the operation's shape: 401 where a key is needed, the
//! refusals of a JSON body (400, 413, 415, 422), of a query string and of
//! typed path segments (400), and 500 for a fault in the hub. A test checks
//! that every operation has an entry and every code a description.
//!
//! `.ci/api-contract` checks the result against a live hub with
//! schemathesis and validates it as OpenAPI 3.1.

use serde_json::{Map, Value, json};

/// An operation's own refusals: `(status, codes)`.
pub type Refusals = &'static [(u16, &'static [&'static str])];

/// The operations reached with an agent's client certificate (mutual TLS)
/// instead of an access key.
const AGENT_ONLY: &[&str] = &[
    "chunk",
    "artifact_content",
    "ingress_certificate",
    "backup_report",
    "backup_missing",
    "put_backup_chunk",
    "get_backup_chunk",
    "put_backup_manifest",
    "get_backup_manifest",
];

/// Operations that need no credentials at all: the hub's liveness, and the
/// agent's enrolment and renewal, which prove themselves with what their
/// body carries (a one-time join token; a CSR signed by the registered key).
const PUBLIC: &[&str] = &[
    "health",
    "join",
    "renew",
    "list_agent_binaries",
    "get_agent_binary",
];

/// Every operation (by its `operationId`, the handler's name) and the
/// refusals of its own, beyond those [`complete`] derives.
pub const ERRORS: &[(&str, Refusals)] = &[
    ("health", &[]),
    // access
    ("whoami", &[]),
    (
        "create_user",
        &[
            (400, &["invalid-name"]),
            (403, &["forbidden"]),
            (409, &["already-exists"]),
        ],
    ),
    ("list_users", &[(403, &["forbidden"])]),
    (
        "update_user",
        &[
            (403, &["forbidden"]),
            (404, &["not-found"]),
            (409, &["last-admin-key", "self-demotion"]),
        ],
    ),
    (
        "create_key",
        &[(403, &["forbidden"]), (404, &["not-found"])],
    ),
    ("list_keys", &[(403, &["forbidden"]), (404, &["not-found"])]),
    (
        "delete_key",
        &[
            (403, &["forbidden"]),
            (404, &["not-found"]),
            (409, &["last-admin-key", "key-in-use"]),
        ],
    ),
    // projects
    ("list_projects", &[]),
    (
        "create_project",
        &[(400, &["invalid-name"]), (409, &["already-exists"])],
    ),
    ("get_project", &[(404, &["not-found"])]),
    (
        "delete_project",
        &[
            (403, &["forbidden"]),
            (404, &["not-found"]),
            (409, &["in-use"]),
        ],
    ),
    (
        "update_project",
        &[
            (403, &["forbidden"]),
            (404, &["not-found"]),
            (409, &["archived"]),
        ],
    ),
    (
        "restore_project",
        &[(403, &["forbidden"]), (404, &["not-found"])],
    ),
    (
        "restore_stage",
        &[(404, &["not-found"]), (409, &["archived"])],
    ),
    ("list_members", &[(404, &["not-found"])]),
    (
        "set_member",
        &[
            (403, &["forbidden"]),
            (404, &["not-found"]),
            (409, &["last-owner"]),
        ],
    ),
    (
        "remove_member",
        &[
            (403, &["forbidden"]),
            (404, &["not-found"]),
            (409, &["last-owner"]),
        ],
    ),
    // stages
    (
        "list_stages",
        &[(400, &["invalid-selector"]), (404, &["not-found"])],
    ),
    (
        "create_stage",
        &[
            (400, &["invalid-name", "malformed-uri"]),
            (403, &["wrong-key", "revoked", "not-allowed"]),
            (404, &["not-found"]),
            (
                409,
                &["already-exists", "outpost-full", "in-use", "archived"],
            ),
            (422, &["unknown-outpost", "other-hub"]),
        ],
    ),
    ("get_stage", &[(404, &["not-found"])]),
    (
        "update_stage",
        &[(404, &["not-found"]), (409, &["archived"])],
    ),
    ("delete_stage", &[(404, &["not-found"]), (409, &["in-use"])]),
    (
        "suspend_stage",
        &[(404, &["not-found"]), (409, &["archived"])],
    ),
    (
        "resume_stage",
        &[
            (404, &["not-found"]),
            (409, &["archived", "restore-in-progress"]),
        ],
    ),
    ("stage_status", &[(404, &["not-found"])]),
    (
        "project_status",
        &[(400, &["invalid-selector"]), (404, &["not-found"])],
    ),
    // configs
    (
        "list_project_configs",
        &[(403, &["forbidden"]), (404, &["not-found"])],
    ),
    (
        "list_configs",
        &[(403, &["forbidden"]), (404, &["not-found"])],
    ),
    (
        "get_config",
        &[(403, &["forbidden"]), (404, &["not-found"])],
    ),
    (
        "delete_config",
        &[(404, &["not-found"]), (409, &["archived"])],
    ),
    (
        "add_config_data",
        &[
            (
                400,
                &["invalid-name", "invalid-config-key", "invalid-file-name"],
            ),
            (404, &["not-found"]),
            (409, &["unknown-config-key", "archived"]),
        ],
    ),
    (
        "remove_config_key",
        &[(404, &["not-found"]), (409, &["archived"])],
    ),
    // releases
    ("list_releases", &[(404, &["not-found"])]),
    ("get_release", &[(404, &["not-found"])]),
    (
        "push_release",
        &[(404, &["not-found"]), (409, &["no-build", "archived"])],
    ),
    (
        "push_releases",
        &[
            (
                400,
                &[
                    "no-stages",
                    "too-many-stages",
                    "duplicate-stage",
                    "invalid-selector",
                ],
            ),
            (404, &["not-found"]),
            (409, &["no-build", "archived"]),
            (422, &["no-match"]),
        ],
    ),
    // rollouts
    (
        "create_rollout",
        &[
            (
                400,
                &[
                    "invalid-selector",
                    "invalid-waves",
                    "invalid-threshold",
                    "invalid-timeout",
                    "invalid-pause",
                    "too-many-stages",
                ],
            ),
            (404, &["not-found"]),
            (409, &["rollout-overlap", "missing-config", "archived"]),
            (422, &["no-match"]),
        ],
    ),
    ("list_rollouts", &[(404, &["not-found"])]),
    ("get_rollout", &[(404, &["not-found"])]),
    (
        "pause_rollout",
        &[
            (404, &["not-found"]),
            (409, &["rollout-state", "rollout-busy"]),
        ],
    ),
    (
        "resume_rollout",
        &[
            (404, &["not-found"]),
            (409, &["rollout-state", "rollout-busy"]),
        ],
    ),
    (
        "abort_rollout",
        &[
            (404, &["not-found"]),
            (
                409,
                &["rollout-state", "rollout-busy", "in-use", "archived"],
            ),
        ],
    ),
    // components
    ("list_components", &[(404, &["not-found"])]),
    (
        "control_component",
        &[
            (400, &["invalid-action", "invalid-name"]),
            (404, &["not-found", "no-such-component"]),
            (409, &["no-release", "archived"]),
        ],
    ),
    (
        "stage_logs",
        &[
            (400, &["invalid-since", "invalid-tail", "invalid-name"]),
            (404, &["not-found", "no-such-component"]),
            (409, &["no-release", "outpost-offline"]),
            (429, &["outpost-busy"]),
            (502, &["outpost-logs-failed"]),
        ],
    ),
    // streams into components (WebSocket upgrades; see .ci/schemathesis.toml)
    (
        "exec",
        &[
            (400, &["invalid-request", "invalid-name", "tty-unsupported"]),
            (404, &["not-found", "no-such-component"]),
            (
                409,
                &[
                    "no-release",
                    "component-not-running",
                    "replica-not-running",
                    "outpost-offline",
                    "streams-unsupported",
                ],
            ),
            (429, &["too-many-streams"]),
            (502, &["command-not-started", "exec-failed"]),
            (503, &["outpost-busy", "hub-instance-unreachable"]),
            (504, &["outpost-timeout"]),
        ],
    ),
    (
        "port_forward",
        &[
            (
                400,
                &["invalid-request", "invalid-name", "port-not-exposed"],
            ),
            (404, &["not-found", "no-such-component"]),
            (
                409,
                &[
                    "no-release",
                    "component-not-running",
                    "replica-not-running",
                    "outpost-offline",
                    "streams-unsupported",
                ],
            ),
            (429, &["too-many-streams"]),
            (502, &["connection-refused", "exec-failed"]),
            (503, &["outpost-busy", "hub-instance-unreachable"]),
            (504, &["outpost-timeout", "connection-timeout"]),
        ],
    ),
    (
        "list_audit",
        &[
            (400, &["invalid-limit"]),
            (403, &["forbidden"]),
            (404, &["not-found"]),
        ],
    ),
    // outposts
    ("list_outposts", &[(403, &["forbidden"])]),
    ("list_agent_updates", &[(403, &["forbidden"])]),
    (
        "get_link_profile",
        &[(403, &["forbidden"]), (404, &["not-found"])],
    ),
    (
        "update_link_profile",
        &[
            (
                400,
                &[
                    "invalid-heartbeat",
                    "invalid-bandwidth",
                    "invalid-window",
                    "invalid-timezone",
                ],
            ),
            (403, &["forbidden"]),
            (404, &["not-found"]),
        ],
    ),
    (
        "create_agent_updates",
        &[
            (
                400,
                &[
                    "invalid-selector",
                    "invalid-version",
                    "invalid-deadline",
                    "invalid-waves",
                    "invalid-threshold",
                    "invalid-timeout",
                ],
            ),
            (403, &["forbidden"]),
            (404, &["unknown-agent-version", "not-found"]),
            (409, &["agent-update-refused", "agent-update-under-way"]),
            (422, &["no-match"]),
        ],
    ),
    (
        "create_outpost",
        &[
            (
                400,
                &[
                    "invalid-name",
                    "invalid-label",
                    "invalid-ingress-domain",
                    "invalid-token-ttl",
                ],
            ),
            (403, &["forbidden"]),
            (409, &["already-exists"]),
        ],
    ),
    (
        "get_outpost",
        &[(403, &["forbidden"]), (404, &["not-found"])],
    ),
    (
        "update_outpost",
        &[
            (400, &["invalid-ingress-domain"]),
            (403, &["forbidden"]),
            (404, &["not-found"]),
        ],
    ),
    (
        "delete_outpost",
        &[
            (403, &["forbidden"]),
            (404, &["not-found"]),
            (409, &["in-use"]),
        ],
    ),
    (
        "validate_outpost_uri",
        &[
            (400, &["malformed-uri"]),
            (403, &["wrong-key", "revoked", "not-allowed"]),
            (404, &["not-found"]),
            (409, &["outpost-full"]),
            (422, &["unknown-outpost", "other-hub"]),
        ],
    ),
    (
        "get_outpost_uri",
        &[
            (403, &["forbidden"]),
            (404, &["not-found"]),
            (409, &["local-outpost"]),
        ],
    ),
    (
        "rotate_outpost_uri",
        &[
            (403, &["forbidden"]),
            (404, &["not-found"]),
            (409, &["local-outpost"]),
        ],
    ),
    (
        "revoke_outpost",
        &[
            (403, &["forbidden"]),
            (404, &["not-found"]),
            (409, &["local-outpost"]),
        ],
    ),
    (
        "create_join_token",
        &[
            (400, &["invalid-token-ttl"]),
            (403, &["forbidden"]),
            (404, &["not-found"]),
            (409, &["local-outpost", "revoked"]),
        ],
    ),
    // the agent's endpoints
    (
        "join",
        &[
            (
                401,
                &[
                    "join-token-unknown",
                    "join-token-used",
                    "join-token-expired",
                ],
            ),
            (403, &["revoked"]),
            (422, &["csr-invalid"]),
        ],
    ),
    (
        "renew",
        &[(403, &["unknown-key", "revoked"]), (422, &["csr-invalid"])],
    ),
    (
        "ingress_certificate",
        &[
            (401, &["client-certificate-required"]),
            (
                403,
                &[
                    "unknown-outpost",
                    "revoked",
                    "unknown-key",
                    "ingress-names-refused",
                ],
            ),
            (
                422,
                &[
                    "csr-invalid",
                    "csr-name-mismatch",
                    "invalid-name",
                    "pem-invalid",
                ],
            ),
        ],
    ),
    (
        "chunk",
        &[
            (400, &["invalid-digest"]),
            (401, &["client-certificate-required"]),
            (403, &["unknown-outpost", "revoked", "unknown-key"]),
            (404, &["artifact-not-found"]),
            (416, &["range-not-satisfiable"]),
            (500, &["chunk-damaged-on-hub"]),
            (503, &["artifact-store-unavailable"]),
        ],
    ),
    (
        "artifact_content",
        &[
            (400, &["invalid-digest"]),
            (401, &["client-certificate-required"]),
            (403, &["unknown-outpost", "revoked", "unknown-key"]),
            (404, &["artifact-not-found"]),
            (500, &["chunk-damaged-on-hub"]),
            (503, &["artifact-store-unavailable"]),
        ],
    ),
    // backups
    (
        "create_backup",
        &[
            (400, &["invalid-display-name"]),
            (404, &["not-found"]),
            (409, &["archived", "backup-in-progress"]),
        ],
    ),
    ("list_backups", &[(404, &["not-found"])]),
    ("get_backup", &[(404, &["not-found"])]),
    (
        "delete_backup",
        &[(404, &["not-found"]), (409, &["restore-in-progress"])],
    ),
    (
        "restore_backup",
        &[
            (404, &["not-found"]),
            (
                409,
                &[
                    "archived",
                    "backup-not-completed",
                    "stage-not-suspended",
                    "backup-in-progress",
                ],
            ),
        ],
    ),
    (
        "set_backup_schedule",
        &[
            (400, &["invalid-schedule", "invalid-keep"]),
            (404, &["not-found"]),
            (409, &["archived"]),
        ],
    ),
    (
        "get_backup_schedule",
        &[(404, &["not-found", "no-backup-schedule"])],
    ),
    (
        "delete_backup_schedule",
        &[(404, &["not-found", "no-backup-schedule"])],
    ),
    (
        "backup_report",
        &[
            (400, &["invalid-report"]),
            (401, &["client-certificate-required"]),
            (403, &["unknown-outpost", "revoked", "unknown-key"]),
            (404, &["backup-not-found"]),
            (409, &["backup-not-open"]),
        ],
    ),
    (
        "backup_missing",
        &[
            (400, &["invalid-digest", "too-many-digests"]),
            (401, &["client-certificate-required"]),
            (403, &["unknown-outpost", "revoked", "unknown-key"]),
            (404, &["backup-not-found"]),
            (409, &["backup-not-open"]),
            (503, &["artifact-store-unavailable"]),
        ],
    ),
    (
        "put_backup_chunk",
        &[
            (400, &["invalid-digest"]),
            (401, &["client-certificate-required"]),
            (403, &["unknown-outpost", "revoked", "unknown-key"]),
            (404, &["backup-not-found"]),
            (409, &["backup-not-open"]),
            (413, &["upload-failed"]),
            (422, &["chunk-invalid"]),
            (503, &["artifact-store-unavailable"]),
            (507, &["hub-disk-full"]),
        ],
    ),
    (
        "get_backup_chunk",
        &[
            (400, &["invalid-digest"]),
            (401, &["client-certificate-required"]),
            (403, &["unknown-outpost", "revoked", "unknown-key"]),
            (404, &["backup-not-found"]),
            (409, &["backup-not-completed", "backup-damaged"]),
            (503, &["artifact-store-unavailable"]),
        ],
    ),
    (
        "put_backup_manifest",
        &[
            (401, &["client-certificate-required"]),
            (403, &["unknown-outpost", "revoked", "unknown-key"]),
            (404, &["backup-not-found"]),
            (409, &["backup-not-open", "chunks-missing"]),
            (413, &["upload-failed"]),
            (422, &["invalid-manifest"]),
            (503, &["artifact-store-unavailable"]),
            (507, &["hub-disk-full"]),
        ],
    ),
    (
        "get_backup_manifest",
        &[
            (401, &["client-certificate-required"]),
            (403, &["unknown-outpost", "revoked", "unknown-key"]),
            (404, &["backup-not-found"]),
            (409, &["backup-not-completed", "backup-damaged"]),
            (503, &["artifact-store-unavailable"]),
        ],
    ),
    // builds and their chunks
    ("list_builds", &[(404, &["not-found"])]),
    (
        "create_build",
        &[
            (404, &["not-found"]),
            (409, &["archived"]),
            (422, &["invalid-build", "invalid-manifest"]),
            (503, &["artifact-store-unavailable"]),
        ],
    ),
    ("get_build", &[(404, &["not-found"])]),
    ("delete_build", &[(404, &["not-found"]), (409, &["in-use"])]),
    (
        "missing_chunks",
        &[
            (400, &["invalid-digest", "too-many-digests"]),
            (503, &["artifact-store-unavailable"]),
        ],
    ),
    (
        "put_chunk",
        &[
            (400, &["invalid-digest"]),
            (413, &["chunk-upload-failed"]),
            (422, &["chunk-invalid"]),
            (503, &["artifact-store-unavailable"]),
            (507, &["hub-disk-full"]),
        ],
    ),
    // agent binaries
    ("list_agent_binaries", &[]),
    (
        "get_agent_binary",
        &[
            (400, &["invalid-version", "unknown-arch"]),
            (404, &["not-found", "artifact-not-found"]),
            (500, &["chunk-damaged-on-hub"]),
            (503, &["artifact-store-unavailable"]),
        ],
    ),
    (
        "put_agent_binary",
        &[
            (400, &["invalid-version", "unknown-arch"]),
            (403, &["forbidden"]),
            (409, &["agent-binary-exists"]),
            (413, &["binary-too-large"]),
            (
                422,
                &[
                    "empty-binary",
                    "not-an-executable",
                    "unknown-arch",
                    "arch-mismatch",
                    "chunk-invalid",
                ],
            ),
            (503, &["artifact-store-unavailable"]),
            (507, &["hub-disk-full"]),
        ],
    ),
    (
        "delete_agent_binary",
        &[
            (400, &["invalid-version", "unknown-arch"]),
            (403, &["forbidden"]),
            (404, &["not-found"]),
        ],
    ),
    (
        "collect_garbage",
        &[
            (403, &["forbidden"]),
            (503, &["artifact-store-unavailable"]),
        ],
    ),
];

/// What each code means, for the responses' descriptions.
pub const CODES: &[(&str, &str)] = &[
    ("unauthenticated", "no access key, or not a valid one"),
    ("forbidden", "the caller's role does not allow it"),
    (
        "not-found",
        "the thing named does not exist, or the caller may not see its project",
    ),
    ("already-exists", "something of that name exists"),
    (
        "in-use",
        "others depend on it; `force` (or deleting those first) allows it",
    ),
    (
        "invalid-name",
        "a name is not a DNS label (1-63 of a-z, 0-9, '-'; starting with a letter)",
    ),
    ("invalid-json", "the body is not JSON"),
    (
        "invalid-body",
        "the JSON body does not have the shape the document gives",
    ),
    (
        "body-too-large",
        "the body is larger than the hub takes (2 MiB for JSON)",
    ),
    (
        "unsupported-media-type",
        "the body is not sent as `application/json`",
    ),
    (
        "invalid-query",
        "the query string does not have the parameters' shape",
    ),
    (
        "invalid-path",
        "a segment of the path does not have the parameter's shape",
    ),
    ("internal", "a fault in the hub (its log says more)"),
    (
        "last-admin-key",
        "the change would leave no administrator with an access key",
    ),
    (
        "self-demotion",
        "administrators cannot take their own role away",
    ),
    (
        "key-in-use",
        "the request is signed with the key it would delete",
    ),
    (
        "last-owner",
        "the change would leave the project without an owner",
    ),
    (
        "archived",
        "it (or its project) was deleted and is archived; restore it first",
    ),
    ("malformed-uri", "the text is not an Outpost URI"),
    ("other-hub", "the Outpost URI names another hub"),
    ("unknown-outpost", "no outpost of that name on this hub"),
    (
        "wrong-key",
        "the Outpost URI's key is not the outpost's current one",
    ),
    ("revoked", "the outpost was revoked"),
    (
        "not-allowed",
        "the caller may not place this project's stages on the outpost",
    ),
    ("outpost-full", "the outpost holds as many stages as it may"),
    (
        "invalid-config-key",
        "a config key is not made of letters, digits, '-', '_' and '.'",
    ),
    (
        "invalid-file-name",
        "a config file name is empty or holds '/'",
    ),
    (
        "unknown-config-key",
        "a key marked secret is neither given nor in the config",
    ),
    ("no-build", "the project has no build to release"),
    (
        "no-stages",
        "the push names no stage (or both stages and a selector)",
    ),
    (
        "invalid-selector",
        "the label selector does not parse; the message names the character",
    ),
    (
        "no-match",
        "the label selector chooses no live stage (no outpost, for agent updates)",
    ),
    (
        "invalid-heartbeat",
        "the link profile's heartbeat is not a duration from 5 s to 1 h (or `default`)",
    ),
    (
        "invalid-bandwidth",
        "the delivery cap is not a rate like 1MiB/s or 512KiB/s (or `none`)",
    ),
    (
        "invalid-window",
        "a delivery window does not parse; the message names the character",
    ),
    (
        "invalid-timezone",
        "not an IANA time zone name like Europe/Berlin",
    ),
    (
        "invalid-deadline",
        "the deadline for a new agent to link is outside 10–3600 s",
    ),
    (
        "unknown-agent-version",
        "the hub holds no agent binary of that version",
    ),
    (
        "agent-update-refused",
        "a chosen outpost cannot take the version (another architecture, never linked, or an agent that cannot update itself); the message names each",
    ),
    (
        "agent-update-under-way",
        "a chosen outpost's agent is already being updated; the message names the update",
    ),
    ("invalid-waves", "the wave sizes do not grow to 100%"),
    (
        "invalid-threshold",
        "the success threshold is not a percentage from 0% to 100%",
    ),
    (
        "invalid-timeout",
        "the wave timeout is outside 1 s to 30 days",
    ),
    (
        "invalid-pause",
        "the pause is longer than 30 days, or given with manual",
    ),
    (
        "rollout-overlap",
        "another active rollout holds some of the stages; the message names it",
    ),
    (
        "missing-config",
        "some selected stages lack the config the rollout names",
    ),
    (
        "rollout-state",
        "the rollout's state does not allow the change (e.g. it finished)",
    ),
    (
        "rollout-busy",
        "the rollout kept changing while the change was made",
    ),
    (
        "too-many-stages",
        "the push names more stages than one push may",
    ),
    ("duplicate-stage", "the push names a stage twice"),
    (
        "invalid-action",
        "the action is not start, stop or restart, or `now`/`kill` do not go with it",
    ),
    (
        "no-such-component",
        "the stage's latest release has no such component",
    ),
    ("no-release", "the stage has no release yet"),
    ("invalid-since", "`since` is neither a time nor a duration"),
    (
        "invalid-tail",
        "`tail` asks for more lines than one request may",
    ),
    ("outpost-offline", "the stage's outpost is not connected"),
    (
        "outpost-busy",
        "the outpost streams as many logs as it may at once",
    ),
    ("outpost-logs-failed", "the outpost could not read the logs"),
    ("invalid-label", "a label's key or value is not valid"),
    (
        "invalid-ingress-domain",
        "the ingress domain is not a DNS name the hub can use",
    ),
    (
        "invalid-token-ttl",
        "a join token's validity is outside 1 s to 7 days",
    ),
    (
        "local-outpost",
        "the hub's local outpost has no URI, agent or revocation",
    ),
    (
        "join-token-unknown",
        "the join token is not one this hub issued for that outpost",
    ),
    (
        "join-token-used",
        "the join token enrolled an agent already",
    ),
    ("join-token-expired", "the join token has expired"),
    (
        "csr-invalid",
        "the certificate signing request is not valid",
    ),
    (
        "csr-name-mismatch",
        "the certificate signing request names something else",
    ),
    ("pem-invalid", "the PEM text does not parse"),
    (
        "unknown-key",
        "the agent's key is not the one registered for its outpost",
    ),
    (
        "client-certificate-required",
        "the connection presented no agent certificate",
    ),
    (
        "ingress-names-refused",
        "the names are not those of the outpost's own stages",
    ),
    (
        "invalid-digest",
        "a digest is not 64 lowercase hexadecimal characters",
    ),
    (
        "artifact-not-found",
        "no such chunk or artifact for this outpost",
    ),
    ("range-not-satisfiable", "the range lies outside the chunk"),
    (
        "invalid-build",
        "the build's artifacts or commit are not what it needs",
    ),
    (
        "invalid-manifest",
        "the build's (or backup's) manifest is not valid",
    ),
    (
        "too-many-digests",
        "more digests than one query may ask about",
    ),
    (
        "chunk-upload-failed",
        "the upload broke off or is larger than a chunk can be",
    ),
    (
        "chunk-invalid",
        "the upload does not decompress to content with that digest",
    ),
    ("hub-disk-full", "the hub's disk is full"),
    (
        "invalid-version",
        "not an agent version: MAJOR.MINOR.PATCH with an optional -pre-release or +build part",
    ),
    (
        "unknown-arch",
        "not an architecture agent binaries are held for (x86_64, aarch64, arm, riscv64, …)",
    ),
    ("empty-binary", "the uploaded agent binary is empty"),
    ("not-an-executable", "the upload is not an ELF executable"),
    (
        "arch-mismatch",
        "the binary's ELF header names another machine than the architecture in the URL",
    ),
    (
        "binary-too-large",
        "the upload broke off or is larger than an agent binary may be",
    ),
    (
        "agent-binary-exists",
        "another binary is held under this version and architecture; a version names one binary for good",
    ),
    (
        "artifact-store-unavailable",
        "the hub's artifact store (its directory or S3 bucket) is down or refuses the hub",
    ),
    (
        "chunk-damaged-on-hub",
        "a chunk in the hub's artifact store does not verify",
    ),
    (
        "invalid-limit",
        "`limit` is outside the range the operation documents",
    ),
    (
        "invalid-request",
        "the request is not one this operation takes (the message says why)",
    ),
    (
        "tty-unsupported",
        "a terminal was asked for where the component cannot give one",
    ),
    (
        "component-not-running",
        "the component is stopped or its stage suspended",
    ),
    ("replica-not-running", "the replica asked for does not run"),
    (
        "streams-unsupported",
        "the outpost's agent predates exec and port-forward",
    ),
    (
        "too-many-streams",
        "the outpost or the user holds as many streams as allowed",
    ),
    (
        "command-not-started",
        "the outpost could not start the command",
    ),
    ("exec-failed", "the outpost could not open the stream"),
    (
        "hub-instance-unreachable",
        "the hub instance holding the outpost's link did not answer",
    ),
    ("outpost-timeout", "the outpost did not answer in time"),
    ("port-not-exposed", "the component does not list that port"),
    ("connection-refused", "the component refused the connection"),
    (
        "invalid-display-name",
        "the display name is too long or holds control characters",
    ),
    (
        "backup-in-progress",
        "a backup or restore of the stage is pending or running",
    ),
    ("restore-in-progress", "the backup is being restored"),
    (
        "invalid-schedule",
        "the backup schedule is not a cron schedule",
    ),
    (
        "invalid-keep",
        "the count of backups to keep is out of range",
    ),
    ("no-backup-schedule", "the stage has no backup schedule"),
    (
        "backup-not-completed",
        "the backup did not complete, so there is nothing to restore",
    ),
    (
        "stage-not-suspended",
        "a restore needs the stage suspended (`trellis suspend stage`)",
    ),
    (
        "backup-not-found",
        "no such backup of a stage on the caller's outpost",
    ),
    ("backup-not-open", "the backup or restore job has ended"),
    (
        "invalid-report",
        "the report's operation or state is not one",
    ),
    ("upload-failed", "the upload broke off or was too large"),
    (
        "chunks-missing",
        "chunks the manifest lists are not on the hub yet",
    ),
    (
        "backup-damaged",
        "the hub's copy of the backup is lost or damaged",
    ),
    (
        "connection-timeout",
        "the component did not accept the connection in time",
    ),
];

/// What the handlers check of a body's fields that utoipa's attributes
/// cannot say (the names of a map's keys, unique list items): `(schema,
/// pointer to a property, keyword, value)`.
fn rules() -> Vec<(&'static str, &'static str, &'static str, Value)> {
    let name = json!({"type": "string", "pattern": super::params::NAME_PATTERN});
    vec![
        (
            "ConfigData",
            "/properties/env",
            "propertyNames",
            json!({"pattern": "^[A-Za-z0-9_.-]{1,253}$", "not": {"enum": [".", ".."]}}),
        ),
        (
            "ConfigData",
            "/properties/files",
            "propertyNames",
            json!({"pattern": "^[^/]+$", "not": {"enum": [".", ".."]}}),
        ),
        (
            "CreateOutpostRequest",
            "/properties/labels",
            "propertyNames",
            json!({"pattern": "^[A-Za-z0-9_./-]{1,63}$"}),
        ),
        (
            "CreateOutpostRequest",
            "/properties/labels",
            "additionalProperties",
            json!({"type": "string", "maxLength": 253,
                   "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"}),
        ),
        (
            "PushReleasesRequest",
            "/properties/stages",
            "uniqueItems",
            json!(true),
        ),
        ("PushReleasesRequest", "/properties/stages", "items", name),
        (
            "MissingChunksRequest",
            "/properties/digests",
            "items",
            json!({"type": "string", "pattern": super::params::DIGEST_PATTERN}),
        ),
        (
            "IngressCertificateRequest",
            "/properties/names",
            "minItems",
            json!(1),
        ),
        (
            "IngressCertificateRequest",
            "/properties/names",
            "maxItems",
            json!(crate::link::ingress_cert::MAX_NAMES),
        ),
    ]
}

/// Links from what an operation returns to the operations it names, so a
/// client (and schemathesis' stateful phase) can follow them: `(from
/// operation, status, to operation, parameters as runtime expressions)`.
fn links() -> Vec<(&'static str, &'static str, &'static str, Value)> {
    let project = json!({"project": "$response.body#/name"});
    let stage = json!({"project": "$response.body#/project", "stage": "$response.body#/name"});
    let config = json!({"project": "$response.body#/project", "stage": "$response.body#/stage",
                        "config": "$response.body#/name"});
    let build = json!({"project": "$response.body#/project", "build": "$response.body#/name"});
    let outpost = json!({"outpost": "$response.body#/outpost/name"});
    let mut out = Vec::new();
    for to in [
        "get_project",
        "delete_project",
        "list_stages",
        "create_stage",
        "list_builds",
        "list_members",
        "list_project_configs",
        "project_status",
    ] {
        // Not push_releases: it also needs a build, which a new project
        // does not have, so its 404 would name the build, not the project.
        out.push(("create_project", "201", to, project.clone()));
    }
    for to in [
        "get_stage",
        "update_stage",
        "delete_stage",
        "list_releases",
        "push_release",
        "list_configs",
        "suspend_stage",
        "resume_stage",
        "stage_status",
        "list_components",
        "stage_logs",
    ] {
        out.push(("create_stage", "201", to, stage.clone()));
    }
    for to in ["get_config", "delete_config"] {
        out.push(("add_config_data", "200", to, config.clone()));
    }
    out.push((
        "push_release",
        "201",
        "get_release",
        json!({"project": "$response.body#/project", "stage": "$response.body#/stage",
               "number": "$response.body#/number"}),
    ));
    for to in ["get_build", "delete_build"] {
        out.push(("create_build", "201", to, build.clone()));
    }
    for to in ["create_key", "update_user"] {
        out.push((
            "create_user",
            "201",
            to,
            json!({"user": "$response.body#/user"}),
        ));
    }
    out.push((
        "create_key",
        "201",
        "delete_key",
        json!({"id": "$response.body#/key_id"}),
    ));
    for to in [
        "get_outpost",
        "update_outpost",
        "delete_outpost",
        "get_outpost_uri",
        "rotate_outpost_uri",
        "revoke_outpost",
        "create_join_token",
    ] {
        out.push(("create_outpost", "201", to, outpost.clone()));
    }
    out
}

/// The document clients get: `doc` with security, every operation's
/// refusals, the body rules utoipa cannot state, and links added.
pub fn complete(doc: &utoipa::openapi::OpenApi) -> Value {
    let mut doc = serde_json::to_value(doc).unwrap_or_else(|_| json!({}));
    add_security_schemes(&mut doc);
    for (schema, pointer, keyword, value) in rules() {
        let path = format!("/components/schemas/{schema}{pointer}");
        if let Some(target) = doc.pointer_mut(&path).and_then(Value::as_object_mut) {
            target.insert(keyword.into(), value);
        }
    }
    add_links(&mut doc);
    let own: std::collections::HashMap<&str, Refusals> = ERRORS.iter().copied().collect();
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        for item in paths.values_mut() {
            let Some(item) = item.as_object_mut() else {
                continue;
            };
            for (method, op) in item.iter_mut() {
                if !matches!(method.as_str(), "get" | "put" | "post" | "patch" | "delete") {
                    continue;
                }
                let Some(op) = op.as_object_mut() else {
                    continue;
                };
                let id = op
                    .get("operationId")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                complete_operation(op, &id, own.get(id.as_str()).copied().unwrap_or(&[]));
            }
        }
    }
    doc
}

fn add_links(doc: &mut Value) {
    let mut by_id: std::collections::HashMap<String, String> = Default::default();
    if let Some(paths) = doc.get("paths").and_then(Value::as_object) {
        for (path, item) in paths {
            for (method, op) in item.as_object().into_iter().flatten() {
                if let Some(id) = op.get("operationId").and_then(Value::as_str) {
                    by_id.insert(id.to_owned(), format!("/paths/{}/{method}", escape(path)));
                }
            }
        }
    }
    for (from, status, to, parameters) in links() {
        let Some(op) = by_id.get(from) else { continue };
        let Some(response) = doc
            .pointer_mut(&format!("{op}/responses/{status}"))
            .and_then(Value::as_object_mut)
        else {
            continue;
        };
        let links = response.entry("links").or_insert_with(|| json!({}));
        if let Some(links) = links.as_object_mut() {
            links.insert(
                to.to_owned(),
                json!({"operationId": to, "parameters": parameters}),
            );
        }
    }
}

/// A path as one JSON pointer segment.
fn escape(path: &str) -> String {
    path.replace('~', "~0").replace('/', "~1")
}

fn add_security_schemes(doc: &mut Value) {
    let Some(root) = doc.as_object_mut() else {
        return;
    };
    let components = root
        .entry("components")
        .or_insert_with(|| json!({}))
        .as_object_mut();
    if let Some(components) = components {
        components.insert(
            "securitySchemes".into(),
            json!({
                "accessKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "<key-id>:<secret>",
                    "description": "An access key: `Authorization: Bearer <key-id>:<secret>`. \
                        The hub prints the first administrator's at its first start (also in \
                        `<data>/admin.key`); administrators create users and keys."
                },
                "agentCertificate": {
                    "type": "mutualTLS",
                    "description": "An outpost agent's client certificate, issued by the hub's \
                        CA when the agent joined (`trellis agent join`). Only agents use these \
                        endpoints."
                }
            }),
        );
    }
    root.insert("security".into(), json!([{"accessKey": []}]));
}

fn complete_operation(op: &mut Map<String, Value>, id: &str, own: Refusals) {
    let mut refusals: Vec<(u16, Vec<&'static str>)> = Vec::new();
    let mut add =
        |status: u16, codes: &[&'static str]| match refusals.iter_mut().find(|(s, _)| *s == status)
        {
            Some((_, have)) => {
                for code in codes {
                    if !have.contains(code) {
                        have.push(code);
                    }
                }
            }
            None => refusals.push((status, codes.to_vec())),
        };
    if PUBLIC.contains(&id) {
        op.insert("security".into(), json!([]));
    } else if AGENT_ONLY.contains(&id) {
        op.insert("security".into(), json!([{"agentCertificate": []}]));
    } else {
        add(401, &["unauthenticated"]);
    }
    let json_body = op
        .get("requestBody")
        .and_then(|b| b.pointer("/content/application~1json"))
        .is_some();
    if json_body {
        add(400, &["invalid-json"]);
        add(413, &["body-too-large"]);
        add(415, &["unsupported-media-type"]);
        add(422, &["invalid-body"]);
    }
    let params = op
        .get("parameters")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if params.iter().any(|p| p["in"] == "query") {
        add(400, &["invalid-query"]);
    }
    if params
        .iter()
        .any(|p| p["in"] == "path" && p.pointer("/schema/type") != Some(&json!("string")))
    {
        add(400, &["invalid-path"]);
    }
    for (status, codes) in own {
        add(*status, codes);
    }
    if id != "health" {
        add(500, &["internal"]);
    }
    refusals.sort_by_key(|(s, _)| *s);
    let responses = op
        .entry("responses")
        .or_insert_with(|| json!({}))
        .as_object_mut();
    let Some(responses) = responses else {
        return;
    };
    for (status, codes) in refusals {
        responses.insert(status.to_string(), error_response(status, &codes));
    }
}

/// One error response: the `{"error": …}` shape with the codes it carries.
fn error_response(status: u16, codes: &[&str]) -> Value {
    let described: Vec<String> = codes
        .iter()
        .map(|code| {
            let meaning = CODES
                .iter()
                .find(|(c, _)| c == code)
                .map_or("", |(_, m)| *m);
            format!("`{code}`: {meaning}")
        })
        .collect();
    let reason = axum::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    json!({
        "description": format!("{reason}. {}", described.join("; ")),
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message", "hint"],
                            "properties": {
                                "code": {
                                    "type": "string",
                                    "enum": codes,
                                    "description": "Stable, for programs"
                                },
                                "message": {
                                    "type": "string",
                                    "description": "What happened, in words"
                                },
                                "hint": {
                                    "type": "string",
                                    "description": "What to try"
                                }
                            }
                        }
                    }
                },
                "example": {
                    "error": {
                        "code": codes.first().copied().unwrap_or("internal"),
                        "message": "what happened",
                        "hint": "what to try"
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every operation the router serves has its refusals listed, and
    /// nothing is listed that the router does not serve.
    #[test]
    fn every_operation_has_its_refusals() {
        let doc = crate::api::document();
        let mut ids = Vec::new();
        for item in doc["paths"].as_object().unwrap().values() {
            for (method, op) in item.as_object().unwrap() {
                let id = op["operationId"].as_str().unwrap().to_owned();
                assert!(
                    ERRORS.iter().any(|(listed, _)| *listed == id),
                    "{method} {id} has no entry in ERRORS"
                );
                let responses = op["responses"].as_object().unwrap();
                // A WebSocket endpoint's success is its upgrade (101).
                assert!(
                    responses.keys().any(|s| s.starts_with('2') || s == "101"),
                    "{id} documents no success"
                );
                for (status, response) in responses {
                    // An unhealthy instance answers with its health (what
                    // failed), for balancers: not a refusal.
                    if id == "health" && status == "503" {
                        assert!(response.to_string().contains("Health"), "{response}");
                        continue;
                    }
                    if !status.starts_with('2') && status != "101" {
                        let codes = &response["content"]["application/json"]["schema"]["properties"]
                            ["error"]["properties"]["code"]["enum"];
                        assert!(
                            codes.as_array().is_some_and(|c| !c.is_empty()),
                            "{id} {status}"
                        );
                    }
                }
                if id != "health" {
                    assert!(responses.contains_key("500"), "{id}");
                }
                ids.push(id);
            }
        }
        for (listed, _) in ERRORS {
            assert!(
                ids.iter().any(|id| id == listed),
                "ERRORS lists {listed}, which is not served"
            );
        }
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(doc["security"], json!([{"accessKey": []}]));
        let chunk = &doc["paths"]["/agent/chunks/{digest}"]["get"];
        assert_eq!(chunk["security"], json!([{"agentCertificate": []}]));
        assert!(chunk["responses"].get("401").is_some());
        let health = &doc["paths"]["/health"]["get"];
        assert_eq!(health["security"], json!([]));
        assert!(health["responses"].get("401").is_none());
        // A body's refusals, derived from its shape.
        let create = &doc["paths"]["/projects"]["post"]["responses"];
        for status in ["400", "401", "409", "413", "415", "422", "500"] {
            assert!(create.get(status).is_some(), "POST /projects {status}");
        }
    }

    #[test]
    fn every_code_is_described_once() {
        let mut seen = std::collections::HashSet::new();
        for (code, meaning) in CODES {
            assert!(seen.insert(*code), "{code} described twice");
            assert!(!meaning.is_empty(), "{code}");
        }
        for (op, refusals) in ERRORS {
            for (_, codes) in *refusals {
                for code in *codes {
                    assert!(seen.contains(code), "{op}: code {code} has no description");
                }
            }
        }
    }
}
