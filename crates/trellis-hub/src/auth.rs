//! Access keys: minting, hashing, and recognising the caller of a request.
//!
//! A key is `<key-id>:<secret>`. Only an argon2id hash of the secret is
//! stored. Argon2 is deliberately slow, so a key that verified once is
//! remembered in this process as a BLAKE3 hash of its secret (memory only,
//! never written) and later requests are checked against that in
//! microseconds.

use std::collections::HashMap;
use std::sync::Mutex;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use rand::RngCore;
use rand::rngs::OsRng;
use trellis_model::{AccessKey, AccessKeyInfo, Role};
use trellis_store::{Store, StoredAccessKey};

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// A freshly minted key: the full key (shown once) and what gets stored.
pub struct MintedKey {
    pub key: AccessKey,
    pub stored: StoredAccessKey,
}

/// Creates a random key for `user`. The secret has 256 bits of entropy.
pub fn mint_key(user: &str, description: &str) -> anyhow::Result<MintedKey> {
    let mut id_bytes = [0u8; 8];
    OsRng.fill_bytes(&mut id_bytes);
    let mut secret_bytes = [0u8; 32];
    OsRng.fill_bytes(&mut secret_bytes);
    let key = AccessKey {
        id: format!("tk_{}", hex::encode(id_bytes)),
        secret: hex::encode(secret_bytes),
    };
    let salt = SaltString::generate(&mut OsRng);
    let secret_hash = Argon2::default()
        .hash_password(key.secret.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("hashing a new access key failed: {e}"))?
        .to_string();
    Ok(MintedKey {
        stored: StoredAccessKey {
            info: AccessKeyInfo {
                id: key.id.clone(),
                user: user.to_owned(),
                description: description.to_owned(),
                created_at: chrono::Utc::now(),
            },
            secret_hash,
        },
        key,
    })
}

/// Checks presented keys against the store, remembering the ones that
/// verified.
#[derive(Default)]
pub struct KeyVerifier {
    verified: Mutex<HashMap<String, blake3::Hash>>,
}

impl KeyVerifier {
    /// Returns the key's owner if the key is valid.
    pub async fn verify(&self, store: &dyn Store, key: &AccessKey) -> ApiResult<String> {
        let Some(stored) = store.find_access_key(&key.id).await? else {
            self.forget(&key.id);
            return Err(invalid_key());
        };
        let presented = blake3::hash(key.secret.as_bytes());
        let cached = self.lock().get(&key.id).copied();
        // `blake3::Hash` compares in constant time.
        if cached == Some(presented) {
            return Ok(stored.info.user);
        }
        let secret = key.secret.clone();
        let hash = stored.secret_hash.clone();
        let ok = tokio::task::spawn_blocking(move || {
            PasswordHash::new(&hash)
                .map(|parsed| {
                    Argon2::default()
                        .verify_password(secret.as_bytes(), &parsed)
                        .is_ok()
                })
                .unwrap_or(false)
        })
        .await
        .map_err(|e| ApiError::internal(format!("verifying an access key failed: {e}")))?;
        if !ok {
            return Err(invalid_key());
        }
        self.lock().insert(key.id.clone(), presented);
        Ok(stored.info.user)
    }

    /// Drops a key from the cache (after it is deleted).
    pub fn forget(&self, id: &str) {
        self.lock().remove(id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, blake3::Hash>> {
        // A poisoned lock only means another request panicked mid-insert; the
        // map itself is still a valid cache.
        self.verified.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn invalid_key() -> ApiError {
    ApiError::unauthenticated(
        "the access key is not valid: its key id is unknown or its secret is wrong",
    )
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: String,
    pub admin: bool,
    /// The id of the access key the request was signed with.
    pub key_id: String,
    /// The request was forwarded by another hub instance on the user's
    /// behalf (see [`crate::cluster::forward`]): it is not forwarded again.
    pub forwarded: bool,
}

impl Caller {
    pub fn require_admin(&self, doing: &str) -> ApiResult<()> {
        if self.admin {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                format!(
                    "only administrators may {doing}; you are signed in as {:?}",
                    self.user
                ),
                "ask an administrator to do it, or to give you an administrator key",
            ))
        }
    }

    /// The caller's role in `project`. Administrators act as owners of
    /// every project. Non-members get the same answer as for a project that
    /// does not exist.
    pub async fn role_in(&self, state: &AppState, project: &str) -> ApiResult<Role> {
        match state.store().get_project(project).await {
            Ok(_) => {}
            Err(trellis_store::StoreError::NotFound { .. }) => {
                return Err(ApiError::project_not_found(project));
            }
            Err(e) => return Err(e.into()),
        }
        match (
            state.store().role_of(project, &self.user).await?,
            self.admin,
        ) {
            (Some(role), _) => Ok(role),
            (None, true) => Ok(Role::Owner),
            (None, false) => Err(ApiError::project_not_found(project)),
        }
    }

    /// [`Caller::role_in`] for a change: an archived project is refused
    /// (409 `archived`), to members; others still get the 404.
    pub async fn role_in_live(&self, state: &AppState, project: &str) -> ApiResult<Role> {
        let role = self.role_in(state, project).await?;
        let record = state.store().get_project(project).await?;
        if let Some(at) = record.archived_at {
            return Err(crate::error::archived("project", project, project, at));
        }
        Ok(role)
    }

    pub async fn require_owner(
        &self,
        state: &AppState,
        project: &str,
        doing: &str,
    ) -> ApiResult<()> {
        match self.role_in(state, project).await? {
            Role::Owner => Ok(()),
            Role::Member => Err(ApiError::forbidden(
                format!("only owners of project {project:?} may {doing}"),
                "ask one of the project's owners (`trellis list member -p PROJECT`)",
            )),
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if let Some(forwarded) = parts.headers.get(crate::cluster::forward::HEADER) {
            let value = forwarded.to_str().map_err(|_| {
                ApiError::unauthenticated("the forwarded request's header is not readable text")
            })?;
            let path = parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            let user = crate::cluster::forward::verify(state, parts.method.as_str(), path, value)?;
            let user = state.store().get_user(&user).await?;
            return Ok(Caller {
                user: user.name,
                admin: user.admin,
                // The forwarding instance checked the key; only requests
                // that read (logs) are forwarded, and none asks which key.
                key_id: String::new(),
                forwarded: true,
            });
        }
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthenticated("this request carries no access key"))?;
        let value = header.to_str().map_err(|_| {
            ApiError::unauthenticated("the Authorization header is not readable text")
        })?;
        let token = value.strip_prefix("Bearer ").ok_or_else(|| {
            ApiError::unauthenticated("the Authorization header is not of the form `Bearer <key>`")
        })?;
        let key: AccessKey = token
            .parse()
            .map_err(|e: trellis_model::AccessKeyParseError| {
                ApiError::unauthenticated(e.to_string())
            })?;
        let user = state.keys().verify(state.store(), &key).await?;
        let user = state.store().get_user(&user).await?;
        Ok(Caller {
            user: user.name,
            admin: user.admin,
            key_id: key.id,
            forwarded: false,
        })
    }
}
