//! Access keys and project roles.
//!
//! An access key has the shape `<key-id>:<secret>`. The key id is public (it
//! names the key in listings and logs); the secret is shown once when the key
//! is created and only its hash is stored.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A member's role in a project. Owners may manage members and delete the
/// project; members may do everything else within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Member,
    Owner,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Member => "member",
            Role::Owner => "owner",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "owner" => Ok(Role::Owner),
            "member" => Ok(Role::Member),
            other => Err(format!("unknown role {other:?}; use owner or member")),
        }
    }
}

/// A parsed `<key-id>:<secret>` access key.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessKey {
    pub id: String,
    pub secret: String,
}

// The secret must never reach a log line through `{:?}`.
impl fmt::Debug for AccessKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessKey")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl fmt::Display for AccessKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.id, self.secret)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the access key is malformed ({reason}); an access key looks like `tk_0123abcd:secret`, as printed when it was created"
)]
pub struct AccessKeyParseError {
    pub reason: &'static str,
}

impl FromStr for AccessKey {
    type Err = AccessKeyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (id, secret) = s.split_once(':').ok_or(AccessKeyParseError {
            reason: "no ':' between key id and secret",
        })?;
        if id.is_empty() || id.len() > 64 {
            return Err(AccessKeyParseError {
                reason: "the key id is empty or too long",
            });
        }
        if secret.is_empty() || secret.len() > 256 {
            return Err(AccessKeyParseError {
                reason: "the secret is empty or too long",
            });
        }
        let printable = |t: &str| t.bytes().all(|b| b.is_ascii_graphic() && b != b':');
        if !printable(id) || !printable(secret) {
            return Err(AccessKeyParseError {
                reason: "it contains spaces, control characters or a second ':'",
            });
        }
        Ok(AccessKey {
            id: id.to_owned(),
            secret: secret.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_redacts() {
        let k: AccessKey = "tk_ab12:s3cr3t".parse().unwrap();
        assert_eq!(k.id, "tk_ab12");
        assert_eq!(k.to_string(), "tk_ab12:s3cr3t");
        assert!(!format!("{k:?}").contains("s3cr3t"));
    }

    #[test]
    fn rejects_malformed_keys() {
        for bad in ["", "nocolon", ":secret", "id:", "id:a:b", "id:with space"] {
            assert!(bad.parse::<AccessKey>().is_err(), "{bad}");
        }
    }
}
