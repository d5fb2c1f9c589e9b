//! SHA-256 fingerprints, written `sha256:<64 hex digits>`.
//!
//! Two types, so a CA fingerprint can never be compared with a key
//! fingerprint by mistake: [`CaFingerprint`] (of the hub CA certificate's
//! DER, pinned by agents during join) and [`KeyFingerprint`] (of a public
//! key's SubjectPublicKeyInfo DER, which the hub records per outpost so an
//! agent can later prove it holds the same key).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const PREFIX: &str = "sha256:";

/// Why a string is not a fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the {what} fingerprint is not valid: {reason}; a fingerprint looks like sha256: followed \
     by 64 hex digits"
)]
pub struct FingerprintError {
    pub what: &'static str,
    pub reason: &'static str,
}

impl FingerprintError {
    pub fn code(&self) -> &'static str {
        "fingerprint-malformed"
    }
}

fn parse(what: &'static str, s: &str) -> Result<[u8; 32], FingerprintError> {
    let s = s.trim();
    let hex_part = match s.get(..PREFIX.len()) {
        Some(p) if p.eq_ignore_ascii_case(PREFIX) => &s[PREFIX.len()..],
        _ => s,
    };
    if hex_part.len() != 64 {
        return Err(FingerprintError {
            what,
            reason: "it does not have 64 hex digits",
        });
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out).map_err(|_| FingerprintError {
        what,
        reason: "it contains a character that is not a hex digit",
    })?;
    Ok(out)
}

macro_rules! fingerprint_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// The SHA-256 of `der`.
            pub fn of(der: &[u8]) -> Self {
                $name(super::sha256(der))
            }

            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{PREFIX}{}", hex::encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({self})", stringify!($name))
            }
        }

        impl FromStr for $name {
            type Err = FingerprintError;
            /// Accepts `sha256:<hex>` or bare hex, either case.
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse($what, s).map($name)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let s = String::deserialize(deserializer)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

fingerprint_type!(
    /// SHA-256 of the hub CA certificate's DER.
    CaFingerprint,
    "CA"
);

fingerprint_type!(
    /// SHA-256 of a public key's SubjectPublicKeyInfo DER.
    KeyFingerprint,
    "public key"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        let fp = CaFingerprint::of(b"hello");
        let text = fp.to_string();
        assert!(text.starts_with("sha256:"));
        assert_eq!(text.len(), 7 + 64);
        assert_eq!(text.parse::<CaFingerprint>().unwrap(), fp);
        assert_eq!(text.to_uppercase().parse::<CaFingerprint>().unwrap(), fp);
        assert_eq!(text[7..].parse::<CaFingerprint>().unwrap(), fp);
        let json = serde_json::to_string(&fp).unwrap();
        assert_eq!(serde_json::from_str::<CaFingerprint>(&json).unwrap(), fp);
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "sha256:",
            "sha256:abc",
            &format!("sha256:{}", "g".repeat(64)),
        ] {
            let err = bad.parse::<KeyFingerprint>().unwrap_err();
            assert!(err.to_string().contains("public key fingerprint"), "{err}");
        }
    }
}
