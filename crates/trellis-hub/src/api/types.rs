//! Request and response bodies of the HTTP API that are not domain records.
//! The command line deserialises the same types, so the two cannot drift.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use trellis_model::{ConfigData, NewBuild, Role, StageType};
use utoipa::ToSchema;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HealthResponse {
    pub status: String,
    pub version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WhoAmI {
    pub user: String,
    pub admin: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateUserRequest {
    pub name: String,
    #[serde(default)]
    pub admin: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateKeyRequest {
    #[serde(default)]
    pub description: String,
}

/// A newly created access key. The only time its secret is ever shown.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedKey {
    pub user: String,
    pub key_id: String,
    /// `<key-id>:<secret>`.
    pub key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateProjectRequest {
    pub name: String,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SetMemberRequest {
    pub role: Role,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateStageRequest {
    pub name: String,
    #[serde(rename = "type")]
    pub stage_type: StageType,
    #[serde(default)]
    pub display_name: Option<String>,
    /// Place the stage on the outpost this URI names (validated again);
    /// without it the stage runs on the hub's local outpost.
    #[serde(default)]
    pub outpost_uri: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
pub struct UpdateStageRequest {
    #[serde(default)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub suspended: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateOutpostRequest {
    pub name: String,
    #[serde(default)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub max_stages: Option<u32>,
    /// Validity of the first join token in seconds; 24 hours when absent.
    #[serde(default)]
    pub token_ttl_secs: Option<u64>,
}

/// `POST /projects/{p}/builds`: the build as recorded by `trellis push build`.
pub type CreateBuildRequest = NewBuild;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AddConfigDataRequest {
    #[serde(flatten)]
    pub data: ConfigData,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
pub struct PushReleaseRequest {
    /// Build name; the project's newest build when absent.
    #[serde(default)]
    pub build: Option<String>,
    /// Config of the stage to take (frozen into the release).
    #[serde(default)]
    pub config: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BlobInfoResponse {
    pub digest: String,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
pub struct DeleteQuery {
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
pub struct KeysQuery {
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ValidateOutpostUriRequest {
    pub uri: String,
    /// The project the stage would belong to, to check the caller may
    /// place its stages there.
    #[serde(default)]
    pub project: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OutpostUriResponse {
    pub outpost: String,
    pub uri: String,
}

/// A join token for an outpost's agent, and the command to run on its host.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JoinTokenResponse {
    pub outpost: String,
    /// `tjt1.…`: carries the hub's address and CA fingerprint, and a
    /// one-time secret.
    pub token: String,
    pub expires_at: chrono::DateTime<chrono::Utc>,
    /// What to run on the outpost's host.
    pub command: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedOutpost {
    pub outpost: trellis_model::Outpost,
    pub join: JoinTokenResponse,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
pub struct JoinTokenRequest {
    /// Validity in seconds; 24 hours when absent.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}
