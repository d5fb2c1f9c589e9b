//! The name of a piece of content: a BLAKE3 digest.
//!
//! Everything the store holds is addressed by the digest of its bytes, so a
//! digest is both a name and an integrity check. Its text form (64 lowercase
//! hex characters) is what appears in file names, manifests and messages;
//! parsing is strict so that two spellings can never name the same blob.

use std::fmt;
use std::str::FromStr;

use crate::error::CasError;

/// A BLAKE3 digest (32 bytes) of some content.
///
/// Shown and parsed as 64 lowercase hexadecimal characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; Digest::LEN]);

impl Digest {
    /// Length of a digest in bytes.
    pub const LEN: usize = 32;
    /// Length of a digest's text form in characters.
    pub const HEX_LEN: usize = 2 * Self::LEN;

    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest(*blake3::hash(data).as_bytes())
    }

    /// Wraps raw digest bytes (for example read back from a manifest).
    pub const fn from_bytes(bytes: [u8; Digest::LEN]) -> Digest {
        Digest(bytes)
    }

    /// The raw digest bytes.
    pub const fn as_bytes(&self) -> &[u8; Digest::LEN] {
        &self.0
    }

    /// Converts a finished BLAKE3 hash. Crate-private so that `blake3`
    /// stays out of the public API.
    pub fn from_hash(hash: blake3::Hash) -> Digest {
        Digest(*hash.as_bytes())
    }

    /// The text form: 64 lowercase hexadecimal characters.
    pub fn as_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

/// Inputs longer than this are cut short in error messages, so that a
/// mistaken paste of a whole file does not flood the terminal.
const MAX_ECHOED_INPUT: usize = 80;

impl FromStr for Digest {
    type Err = CasError;

    /// Accepts exactly 64 lowercase hexadecimal characters. Uppercase is
    /// refused rather than folded: digests are also file names, and one
    /// content must have one spelling.
    fn from_str(s: &str) -> Result<Digest, CasError> {
        let fail = |reason: String| {
            let input = match s.char_indices().nth(MAX_ECHOED_INPUT) {
                Some((cut, _)) => format!("{}…", &s[..cut]),
                None => s.to_owned(),
            };
            Err(CasError::InvalidDigest { input, reason })
        };
        if let Some((pos, c)) = s
            .char_indices()
            .find(|&(_, c)| !matches!(c, '0'..='9' | 'a'..='f'))
        {
            let what = if c.is_ascii_hexdigit() {
                "an uppercase hexadecimal digit"
            } else {
                "not a hexadecimal digit"
            };
            return fail(format!("character {c:?} at position {pos} is {what}"));
        }
        // Only ASCII is left at this point, so bytes and characters agree.
        if s.len() != Self::HEX_LEN {
            return fail(format!("it has {} characters instead of 64", s.len()));
        }
        let mut bytes = [0u8; Digest::LEN];
        match hex::decode_to_slice(s, &mut bytes) {
            Ok(()) => Ok(Digest(bytes)),
            // Unreachable after the checks above; reported rather than
            // unwrapped so that a mistake here cannot become a panic.
            Err(e) => fail(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        let d = Digest::of(b"hello");
        let text = d.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text, d.as_hex());
        assert_eq!(text, blake3::hash(b"hello").to_hex().as_str());
        assert_eq!(text.parse::<Digest>().unwrap(), d);
        assert_eq!(Digest::from_bytes(*d.as_bytes()), d);
        assert_eq!(format!("{d:?}"), format!("Digest({text})"));
    }

    #[test]
    fn parse_rejects_wrong_length() {
        let err = "abc".parse::<Digest>().unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("3 characters instead of 64"), "{msg}");
        assert!(msg.contains("64 lowercase hexadecimal"), "{msg}");
        assert!("".parse::<Digest>().is_err());
        let long = "a".repeat(65);
        assert!(long.parse::<Digest>().is_err());
    }

    #[test]
    fn parse_rejects_uppercase_and_non_hex() {
        let upper = Digest::of(b"x").as_hex().to_uppercase();
        let msg = upper.parse::<Digest>().unwrap_err().to_string();
        assert!(msg.contains("uppercase"), "{msg}");

        let mut bad = Digest::of(b"x").as_hex();
        bad.replace_range(10..11, "g");
        let msg = bad.parse::<Digest>().unwrap_err().to_string();
        assert!(msg.contains("'g' at position 10"), "{msg}");

        let msg = format!("{}é", "a".repeat(63))
            .parse::<Digest>()
            .unwrap_err()
            .to_string();
        assert!(msg.contains("not a hexadecimal digit"), "{msg}");
        assert!(" ".repeat(64).parse::<Digest>().is_err());
    }

    #[test]
    fn long_input_is_cut_short_in_message() {
        let msg = "z"
            .repeat(10_000)
            .parse::<Digest>()
            .unwrap_err()
            .to_string();
        assert!(msg.len() < 400, "{msg}");
        assert!(msg.contains('…'), "{msg}");
    }
}
