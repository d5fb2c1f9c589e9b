//! The one-time join token an admin hands to an outpost's operator.
//!
//! It carries everything the agent needs for a safe first contact: the hub's
//! URL, the outpost's name, a one-time secret, and the fingerprint of the
//! hub's CA (so the first TLS connection is authenticated without any
//! pre-installed trust). Text form: `tjt1.` followed by base64url (no
//! padding) of a small JSON object — one word, no spaces, safe to paste
//! into a shell. The `1` versions the format. Expiry and single use are
//! enforced by the hub, which stores only a hash of the secret.

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use super::CaFingerprint;
use trellis_model::{NameKind, validate_name};

/// The token's prefix; also its format version.
pub const JOIN_TOKEN_PREFIX: &str = "tjt1.";
/// No genuine token comes close; bounds the work on garbage.
const MAX_TOKEN_LEN: usize = 4096;

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// The hub's base URL, `https://host:port`.
    pub hub_url: String,
    pub outpost: String,
    pub secret: [u8; 32],
    pub ca_fingerprint: CaFingerprint,
}

// The secret must never reach a log line through `{:?}`.
impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("hub_url", &self.hub_url)
            .field("outpost", &self.outpost)
            .field("secret", &"<redacted>")
            .field("ca_fingerprint", &self.ca_fingerprint)
            .finish()
    }
}

/// The JSON inside the token. Short keys keep the token short.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    hub: String,
    outpost: String,
    secret: String,
    ca: CaFingerprint,
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let wire = Wire {
            hub: self.hub_url.clone(),
            outpost: self.outpost.clone(),
            secret: URL_SAFE_NO_PAD.encode(self.secret),
            ca: self.ca_fingerprint,
        };
        // Serialising a struct of strings into JSON cannot fail.
        let json = serde_json::to_vec(&wire).map_err(|_| fmt::Error)?;
        write!(f, "{JOIN_TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }
}

/// Why a string is not a join token. Never quotes the token (it holds a
/// secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the join token is not valid: {reason}; a join token starts with `tjt1.` and is printed \
     by `trellis create outpost` — copy it whole, or ask the hub admin for a new one"
)]
pub struct JoinTokenError {
    pub reason: String,
}

impl JoinTokenError {
    pub fn code(&self) -> &'static str {
        "join-token-malformed"
    }
}

fn fail<T>(reason: impl Into<String>) -> Result<T, JoinTokenError> {
    Err(JoinTokenError {
        reason: reason.into(),
    })
}

impl FromStr for JoinToken {
    type Err = JoinTokenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_TOKEN_LEN {
            return fail(format!("it is {} bytes long, far too long", s.len()));
        }
        let s = s.trim();
        if s.is_empty() {
            return fail("it is empty");
        }
        let Some(body) = s.strip_prefix(JOIN_TOKEN_PREFIX) else {
            if s.starts_with("tjt") {
                return fail(
                    "it is of a format version this agent does not know; upgrade the agent",
                );
            }
            return fail("it does not start with `tjt1.`");
        };
        let Ok(json) = URL_SAFE_NO_PAD.decode(body) else {
            return fail("the part after `tjt1.` is not base64url; was it cut off or wrapped?");
        };
        let wire: Wire = serde_json::from_slice(&json).map_err(|e| JoinTokenError {
            reason: format!("its contents are not readable ({e})"),
        })?;

        if !wire.hub.starts_with("https://") || wire.hub.len() <= "https://".len() {
            return fail("the hub URL in it is not an https:// URL");
        }
        if wire
            .hub
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return fail("the hub URL in it contains spaces or control characters");
        }
        if let Err(e) = validate_name(NameKind::Outpost, &wire.outpost) {
            return fail(format!("the outpost name in it is not valid ({e})"));
        }
        let secret = match URL_SAFE_NO_PAD.decode(&wire.secret) {
            Ok(bytes) => <[u8; 32]>::try_from(bytes.as_slice()).ok(),
            Err(_) => None,
        };
        let Some(secret) = secret else {
            return fail("the secret in it is not 32 bytes of base64url");
        };
        Ok(JoinToken {
            hub_url: wire.hub,
            outpost: wire.outpost,
            secret,
            ca_fingerprint: wire.ca,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> JoinToken {
        JoinToken {
            hub_url: "https://hub.example:7443".into(),
            outpost: "factory-7".into(),
            secret: [7; 32],
            ca_fingerprint: CaFingerprint::of(b"ca"),
        }
    }

    #[test]
    fn round_trips_as_one_shell_safe_word() {
        let text = token().to_string();
        assert!(text.starts_with("tjt1."));
        assert!(
            text.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
            "{text}"
        );
        assert_eq!(text.parse::<JoinToken>().unwrap(), token());
        assert_eq!(format!("  {text}\n").parse::<JoinToken>().unwrap(), token());
    }

    #[test]
    fn debug_redacts_the_secret() {
        let debug = format!("{:?}", token());
        assert!(debug.contains("<redacted>"));
        assert!(!debug.contains("7, 7"));
    }

    #[test]
    fn rejects_garbage_with_clear_reasons() {
        let good = token().to_string();
        let enc = |json: &str| format!("tjt1.{}", URL_SAFE_NO_PAD.encode(json));
        let fp = CaFingerprint::of(b"ca");
        let secret = URL_SAFE_NO_PAD.encode([7u8; 32]);
        let cases = [
            (String::new(), "empty"),
            ("tjt2.abc".into(), "format version"),
            ("hello".into(), "does not start"),
            (good[..good.len() - 5].to_owned() + "!!!!!", "not base64url"),
            (good[..good.len() - 10].to_owned(), "not readable"),
            (enc("{}"), "not readable"),
            (
                enc(&format!(
                    r#"{{"hub":"http://h:1","outpost":"a","secret":"{secret}","ca":"{fp}"}}"#
                )),
                "https://",
            ),
            (
                enc(&format!(
                    r#"{{"hub":"https://h:1","outpost":"A","secret":"{secret}","ca":"{fp}"}}"#
                )),
                "outpost name",
            ),
            (
                enc(&format!(
                    r#"{{"hub":"https://h:1","outpost":"a","secret":"abc","ca":"{fp}"}}"#
                )),
                "32 bytes",
            ),
            (
                enc(&format!(
                    r#"{{"hub":"https://h:1","outpost":"a","secret":"{secret}","ca":"sha256:00"}}"#
                )),
                "not readable",
            ),
            ("x".repeat(MAX_TOKEN_LEN + 1), "too long"),
        ];
        for (input, expect) in cases {
            let err = input.parse::<JoinToken>().unwrap_err();
            assert!(err.to_string().contains(expect), "{input:?}: {err}");
            assert_eq!(err.code(), "join-token-malformed");
        }
    }
}
