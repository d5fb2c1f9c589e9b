//! The Outpost URI: the capability a user pastes to place a stage on an outpost.
//!
//! Shape: `trellis://HOST:PORT/OUTPOST?key=KEY`.
//!
//! - `HOST` is the hub's DNS name, an IPv4 address or a bracketed IPv6 address;
//! - `PORT` is required (1–65535), so the URI never depends on a default;
//! - `OUTPOST` is the outpost's name (a DNS label, see [`crate::name`]);
//! - `KEY` is the outpost's 256-bit link key, base64url without padding
//!   (always 43 characters).
//!
//! `outpost://` is accepted as an alias scheme when parsing; formatting always
//! writes `trellis://`. Surrounding whitespace is tolerated because the URI is
//! copied and pasted; everything else is parsed strictly (no userinfo, no
//! fragment, no percent-encoding, no extra query parameters, ASCII only),
//! because a lenient parser of a capability is a parser whose two readings of
//! one string can disagree.
//!
//! The key is a secret: it is redacted from `Debug` output and never echoed in
//! an error message.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::name::{NameKind, validate_name};

/// The scheme written when formatting an Outpost URI.
pub const SCHEME: &str = "trellis";
/// A scheme accepted as an alias when parsing.
pub const ALIAS_SCHEME: &str = "outpost";
/// The longest input the parser looks at. A real URI is well under 400 bytes
/// (253-byte host, 63-byte name, 43-byte key); the limit bounds the work done
/// on hostile input.
pub const MAX_URI_LEN: usize = 512;
/// Length of a link key in bytes (256 bits).
pub const LINK_KEY_LEN: usize = 32;
/// Length of a link key in base64url without padding.
pub const LINK_KEY_B64_LEN: usize = 43;

const EXAMPLE: &str = "trellis://hub.example:7443/factory-7?key=…";

// === LinkKey ===

/// The secret half of an Outpost URI: 256 random bits that let their holder
/// place stages on one outpost. Compared in constant time; redacted in `Debug`.
#[derive(Clone)]
pub struct LinkKey([u8; LINK_KEY_LEN]);

impl LinkKey {
    /// Wraps key material. The caller supplies the randomness (this crate has
    /// no I/O and no RNG), e.g. `LinkKey::from_bytes(rand::random())`.
    pub fn from_bytes(bytes: [u8; LINK_KEY_LEN]) -> Self {
        LinkKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; LINK_KEY_LEN] {
        &self.0
    }
}

// Constant time, so that comparing a presented key against the stored one
// reveals nothing through timing about how many leading bytes matched.
impl PartialEq for LinkKey {
    fn eq(&self, other: &Self) -> bool {
        let diff = self
            .0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(diff) == 0
    }
}

impl Eq for LinkKey {}

impl fmt::Debug for LinkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LinkKey(<redacted>)")
    }
}

impl fmt::Display for LinkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&base64url::encode(&self.0))
    }
}

impl FromStr for LinkKey {
    type Err = OutpostUriError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_key(s)
    }
}

impl Serialize for LinkKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for LinkKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

// === OutpostUri ===

/// A parsed Outpost URI. `Display` writes the canonical form, which parses
/// back to an equal value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutpostUri {
    /// The hub's host: a lowercase DNS name, an IPv4 address, or an IPv6
    /// address in canonical form *without* brackets.
    pub host: String,
    pub port: u16,
    /// The outpost's name.
    pub outpost: String,
    pub key: LinkKey,
}

impl OutpostUri {
    /// Builds a URI from parts, validating and normalising the host and the
    /// outpost name exactly as parsing would.
    pub fn new(
        host: &str,
        port: u16,
        outpost: &str,
        key: LinkKey,
    ) -> Result<Self, OutpostUriError> {
        let host = if host.starts_with('[') {
            parse_bracketed_ipv6(host)?
        } else if let Ok(v6) = host.parse::<Ipv6Addr>() {
            // Callers (the hub) may hold a bare IPv6 address.
            v6.to_string()
        } else {
            parse_host(host)?
        };
        if port == 0 {
            return Err(OutpostUriError::new(
                UriPart::Port,
                "0 is not a number between 1 and 65535",
            ));
        }
        validate_outpost(outpost)?;
        Ok(OutpostUri {
            host,
            port,
            outpost: outpost.to_owned(),
            key,
        })
    }

    /// `host:port` as it appears in the URI (IPv6 hosts in brackets), e.g.
    /// to compare with the hub's own public address.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for OutpostUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}://{}/{}?key={}",
            self.authority(),
            self.outpost,
            self.key
        )
    }
}

impl FromStr for OutpostUri {
    type Err = OutpostUriError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        // Length first, so nothing below runs on an unbounded input.
        if input.len() > MAX_URI_LEN {
            return Err(OutpostUriError::new(
                UriPart::Whole,
                format!(
                    "it is {} bytes long, more than the {MAX_URI_LEN} an Outpost URI can be",
                    input.len()
                ),
            ));
        }
        let s = input.trim();
        if s.is_empty() {
            return Err(OutpostUriError::new(UriPart::Whole, "it is empty"));
        }
        check_characters(s)?;

        let (scheme, rest) = s.split_once("://").ok_or_else(|| {
            OutpostUriError::new(
                UriPart::Scheme,
                "it does not start with `trellis://` (or `outpost://`)",
            )
        })?;
        if !scheme.eq_ignore_ascii_case(SCHEME) && !scheme.eq_ignore_ascii_case(ALIAS_SCHEME) {
            return Err(OutpostUriError::new(
                UriPart::Scheme,
                format!("{scheme:?} is not `trellis` (or `outpost`)"),
            ));
        }

        let (authority, path_and_query) = rest.split_once('/').ok_or_else(|| {
            OutpostUriError::new(
                UriPart::Outpost,
                "it is missing: put `/` and the outpost's name after the port",
            )
        })?;
        let (host, port) = split_authority(authority)?;
        let port = parse_port(port)?;

        let (outpost, query) = match path_and_query.split_once('?') {
            Some((outpost, query)) => (outpost, Some(query)),
            None => (path_and_query, None),
        };
        validate_outpost(outpost)?;

        let query = query.ok_or_else(|| {
            OutpostUriError::new(
                UriPart::Key,
                "it is missing: the URI must end with `?key=` and the outpost's link key",
            )
        })?;
        if query.contains('&') || query.contains(';') {
            return Err(OutpostUriError::new(
                UriPart::Query,
                "it has more than one parameter; only `key=` is allowed",
            ));
        }
        let key = match query.split_once('=') {
            Some(("key", key)) => parse_key(key)?,
            Some((name, _)) => {
                return Err(OutpostUriError::new(
                    UriPart::Query,
                    format!("the parameter {name:?} is not `key`"),
                ));
            }
            None => {
                return Err(OutpostUriError::new(
                    UriPart::Query,
                    "it is not of the form `key=…`",
                ));
            }
        };

        Ok(OutpostUri {
            host,
            port,
            outpost: outpost.to_owned(),
            key,
        })
    }
}

impl Serialize for OutpostUri {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for OutpostUri {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

// === errors ===

/// Which part of an Outpost URI an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UriPart {
    Whole,
    Scheme,
    Host,
    Port,
    Outpost,
    Key,
    Query,
}

impl fmt::Display for UriPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UriPart::Whole => "text",
            UriPart::Scheme => "scheme",
            UriPart::Host => "host",
            UriPart::Port => "port",
            UriPart::Outpost => "outpost name",
            UriPart::Key => "key",
            UriPart::Query => "query",
        })
    }
}

/// Why a string is not an Outpost URI. The reason never contains the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutpostUriError {
    pub part: UriPart,
    pub reason: String,
}

impl OutpostUriError {
    fn new(part: UriPart, reason: impl Into<String>) -> Self {
        OutpostUriError {
            part,
            reason: reason.into(),
        }
    }

    /// The stable error code the API and CLI report.
    pub fn code(&self) -> &'static str {
        "malformed-uri"
    }
}

impl fmt::Display for OutpostUriError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.part {
            UriPart::Whole => write!(f, "the Outpost URI is not valid: {}", self.reason)?,
            part => write!(f, "the Outpost URI's {part} is not valid: {}", self.reason)?,
        }
        write!(
            f,
            "; an Outpost URI looks like {EXAMPLE} (ask the hub admin for it: `trellis get outpost-uri NAME`)"
        )
    }
}

impl std::error::Error for OutpostUriError {}

// === parsing helpers ===

fn check_characters(s: &str) -> Result<(), OutpostUriError> {
    for (i, c) in s.char_indices() {
        let reason = if !c.is_ascii() {
            "a non-ASCII character"
        } else if c.is_ascii_control() {
            "a control character"
        } else if c == ' ' {
            "a space"
        } else if c == '%' {
            "percent-encoding ('%'), which Outpost URIs never use"
        } else if c == '#' {
            "a fragment ('#'), which Outpost URIs never have"
        } else {
            continue;
        };
        return Err(OutpostUriError::new(
            UriPart::Whole,
            format!("it contains {reason} at byte {i}"),
        ));
    }
    Ok(())
}

/// Splits `host:port` (or `[v6]:port`) and validates the host.
fn split_authority(authority: &str) -> Result<(String, &str), OutpostUriError> {
    if authority.is_empty() {
        return Err(OutpostUriError::new(UriPart::Host, "it is empty"));
    }
    if authority.contains('@') {
        return Err(OutpostUriError::new(
            UriPart::Host,
            "it contains user information ('…@'), which Outpost URIs never have",
        ));
    }
    if authority.starts_with('[') {
        let end = authority.find(']').ok_or_else(|| {
            OutpostUriError::new(UriPart::Host, "the IPv6 address has no closing ']'")
        })?;
        let (bracketed, after) = authority.split_at(end + 1);
        let host = parse_bracketed_ipv6(bracketed)?;
        let port = after.strip_prefix(':').ok_or_else(missing_port)?;
        return Ok((host, port));
    }
    let (host, port) = authority.rsplit_once(':').ok_or_else(missing_port)?;
    if host.contains(':') {
        return Err(OutpostUriError::new(
            UriPart::Host,
            "an IPv6 address must be written in brackets, e.g. [2001:db8::1]:7443",
        ));
    }
    Ok((parse_host(host)?, port))
}

fn missing_port() -> OutpostUriError {
    OutpostUriError::new(
        UriPart::Port,
        "it is missing: write the hub's port after the host, e.g. hub.example:7443",
    )
}

fn parse_bracketed_ipv6(s: &str) -> Result<String, OutpostUriError> {
    let inner = s
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .ok_or_else(|| {
            OutpostUriError::new(UriPart::Host, "an IPv6 address must be in brackets")
        })?;
    let addr: Ipv6Addr = inner.parse().map_err(|_| {
        OutpostUriError::new(
            UriPart::Host,
            format!("{inner:?} in brackets is not an IPv6 address"),
        )
    })?;
    Ok(addr.to_string())
}

/// Validates a DNS name or IPv4 address and returns it normalised (lowercase).
fn parse_host(host: &str) -> Result<String, OutpostUriError> {
    let fail = |reason: String| Err(OutpostUriError::new(UriPart::Host, reason));
    if host.is_empty() {
        return fail("it is empty".into());
    }
    // Anything made only of digits and dots is meant as an IPv4 address and
    // must be one; otherwise "1.2.3" would silently become a DNS name.
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return match host.parse::<Ipv4Addr>() {
            Ok(addr) => Ok(addr.to_string()),
            Err(_) => fail(format!("{host:?} is not an IPv4 address")),
        };
    }
    if host.len() > 253 {
        return fail("it is longer than the 253 characters a DNS name can have".into());
    }
    let lower = host.to_ascii_lowercase();
    for label in lower.split('.') {
        if label.is_empty() {
            return fail(format!(
                "{host:?} has an empty label (two dots, or a dot at an end)"
            ));
        }
        if label.len() > 63 {
            return fail(format!("{host:?} has a label longer than 63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return fail(format!(
                "{host:?} contains a character other than letters, digits, '-' and '.'"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return fail(format!("{host:?} has a label that starts or ends with '-'"));
        }
    }
    Ok(lower)
}

fn parse_port(port: &str) -> Result<u16, OutpostUriError> {
    let invalid = || {
        OutpostUriError::new(
            UriPart::Port,
            format!("{port:?} is not a number between 1 and 65535"),
        )
    };
    if port.is_empty() {
        return Err(missing_port());
    }
    // `u16::from_str` would also take a leading '+'.
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(invalid()),
        Ok(p) => Ok(p),
    }
}

fn validate_outpost(outpost: &str) -> Result<(), OutpostUriError> {
    if outpost.is_empty() {
        return Err(OutpostUriError::new(
            UriPart::Outpost,
            "it is missing: put the outpost's name after the port, e.g. /factory-7",
        ));
    }
    if outpost.contains('/') {
        return Err(OutpostUriError::new(
            UriPart::Outpost,
            format!("{outpost:?} contains '/'; the path is just the outpost's name"),
        ));
    }
    validate_name(NameKind::Outpost, outpost)
        .map_err(|e| OutpostUriError::new(UriPart::Outpost, e.to_string()))
}

// Errors here describe the key's shape only; the value is a secret.
fn parse_key(key: &str) -> Result<LinkKey, OutpostUriError> {
    let fail = |reason: &str| Err(OutpostUriError::new(UriPart::Key, reason));
    if key.is_empty() {
        return fail("it is empty");
    }
    if key.ends_with('=') {
        return fail("it ends with '=' padding; the key is base64url without padding");
    }
    if key.len() != LINK_KEY_B64_LEN {
        return Err(OutpostUriError::new(
            UriPart::Key,
            format!(
                "it is {} characters long, not {LINK_KEY_B64_LEN}; was the URI cut off when it was copied?",
                key.len()
            ),
        ));
    }
    let Some(bytes) = base64url::decode(key) else {
        return fail("it is not base64url (A-Z, a-z, 0-9, '-' and '_')");
    };
    match <[u8; LINK_KEY_LEN]>::try_from(bytes.as_slice()) {
        Ok(bytes) => Ok(LinkKey(bytes)),
        Err(_) => fail("it does not decode to 32 bytes"),
    }
}

/// Base64url without padding (RFC 4648 §5). Small enough to keep this crate
/// free of a dependency for it.
mod base64url {
    pub(super) const ALPHABET: &[u8; 64] =
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

    pub fn encode(bytes: &[u8]) -> String {
        let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            // A chunk of k bytes carries 8k bits: k + 1 characters.
            for i in 0..=chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 0x3f) as usize] as char);
            }
        }
        out
    }

    /// Decodes unpadded base64url. Returns `None` for characters outside the
    /// alphabet, an impossible length, or non-canonical trailing bits (which
    /// would let two different strings stand for the same key).
    pub fn decode(s: &str) -> Option<Vec<u8>> {
        let s = s.as_bytes();
        if s.len() % 4 == 1 {
            return None;
        }
        let mut out = Vec::with_capacity(s.len() * 3 / 4);
        for chunk in s.chunks(4) {
            let mut n: u32 = 0;
            for (i, &c) in chunk.iter().enumerate() {
                n |= u32::from(value(c)?) << (18 - 6 * i);
            }
            let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            let keep = chunk.len() - 1;
            if bytes[keep..].iter().any(|&b| b != 0) {
                return None;
            }
            out.extend_from_slice(&bytes[..keep]);
        }
        Some(out)
    }

    fn value(c: u8) -> Option<u8> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> LinkKey {
        LinkKey::from_bytes(core::array::from_fn(|i| i as u8 * 7))
    }

    fn example() -> String {
        format!("trellis://hub.example:7443/factory-7?key={}", key())
    }

    fn err(s: &str) -> OutpostUriError {
        s.parse::<OutpostUri>().unwrap_err()
    }

    #[test]
    fn base64url_matches_rfc4648_vectors() {
        for (raw, enc) in [
            ("", ""),
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg"),
            ("fooba", "Zm9vYmE"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64url::encode(raw.as_bytes()), enc);
            assert_eq!(base64url::decode(enc).unwrap(), raw.as_bytes());
        }
        assert_eq!(base64url::encode(&[0xfb, 0xff]), "-_8");
        // Non-canonical trailing bits are refused.
        assert_eq!(base64url::decode("Zh"), None);
        assert_eq!(base64url::decode("Z"), None);
        assert_eq!(base64url::decode("Zm9v+A"), None);
    }

    #[test]
    fn parses_a_dns_host_uri() {
        let uri: OutpostUri = example().parse().unwrap();
        assert_eq!(uri.host, "hub.example");
        assert_eq!(uri.port, 7443);
        assert_eq!(uri.outpost, "factory-7");
        assert_eq!(uri.key, key());
        assert_eq!(uri.to_string(), example());
        assert_eq!(uri.key.to_string().len(), LINK_KEY_B64_LEN);
    }

    #[test]
    fn accepts_alias_scheme_whitespace_and_case_but_formats_canonically() {
        let pasted = format!(
            "  \n OUTPOST://Hub.EXAMPLE:7443/factory-7?key={}\t\r\n",
            key()
        );
        let uri: OutpostUri = pasted.parse().unwrap();
        assert_eq!(uri.to_string(), example());
    }

    #[test]
    fn parses_ip_hosts() {
        let uri: OutpostUri = format!("trellis://10.0.0.1:1/a?key={}", key())
            .parse()
            .unwrap();
        assert_eq!(uri.host, "10.0.0.1");
        assert_eq!(uri.port, 1);
        let uri: OutpostUri = format!("trellis://[2001:DB8:0::1]:65535/a?key={}", key())
            .parse()
            .unwrap();
        assert_eq!(uri.host, "2001:db8::1");
        assert_eq!(uri.authority(), "[2001:db8::1]:65535");
        assert_eq!(
            uri.to_string(),
            format!("trellis://[2001:db8::1]:65535/a?key={}", key())
        );
    }

    #[test]
    fn error_names_the_part_and_shows_the_shape() {
        let e = err(&example().replace("7443", "99999"));
        assert_eq!(e.part, UriPart::Port);
        assert_eq!(e.code(), "malformed-uri");
        assert_eq!(
            e.to_string(),
            "the Outpost URI's port is not valid: \"99999\" is not a number between 1 and 65535; \
             an Outpost URI looks like trellis://hub.example:7443/factory-7?key=… \
             (ask the hub admin for it: `trellis get outpost-uri NAME`)"
        );
    }

    #[test]
    fn rejects_each_malformed_part() {
        let k = key().to_string();
        let cases: Vec<(String, UriPart)> = vec![
            (String::new(), UriPart::Whole),
            ("   ".into(), UriPart::Whole),
            ("x".repeat(MAX_URI_LEN + 1), UriPart::Whole),
            (
                format!("https://hub.example:7443/a?key={k}"),
                UriPart::Scheme,
            ),
            (format!("hub.example:7443/a?key={k}"), UriPart::Scheme),
            (format!("trellis://:7443/a?key={k}"), UriPart::Host),
            (
                format!("trellis://u:p@hub.example:7443/a?key={k}"),
                UriPart::Host,
            ),
            (
                format!("trellis://hub..example:7443/a?key={k}"),
                UriPart::Host,
            ),
            (
                format!("trellis://hub_x.example:7443/a?key={k}"),
                UriPart::Host,
            ),
            (
                format!("trellis://-hub.example:7443/a?key={k}"),
                UriPart::Host,
            ),
            (format!("trellis://1.2.3:7443/a?key={k}"), UriPart::Host),
            (format!("trellis://256.1.1.1:7443/a?key={k}"), UriPart::Host),
            (
                format!("trellis://2001:db8::1:7443/a?key={k}"),
                UriPart::Host,
            ),
            (
                format!("trellis://[2001:db8::1:7443/a?key={k}"),
                UriPart::Host,
            ),
            (format!("trellis://[zz::1]:7443/a?key={k}"), UriPart::Host),
            (format!("trellis://hub.example/a?key={k}"), UriPart::Port),
            (format!("trellis://hub.example:/a?key={k}"), UriPart::Port),
            (format!("trellis://hub.example:0/a?key={k}"), UriPart::Port),
            (
                format!("trellis://hub.example:+80/a?key={k}"),
                UriPart::Port,
            ),
            (format!("trellis://[::1]/a?key={k}"), UriPart::Port),
            (
                format!("trellis://hub.example:7443?key={k}"),
                UriPart::Outpost,
            ),
            (
                format!("trellis://hub.example:7443/?key={k}"),
                UriPart::Outpost,
            ),
            (
                format!("trellis://hub.example:7443/Factory?key={k}"),
                UriPart::Outpost,
            ),
            (
                format!("trellis://hub.example:7443/a/b?key={k}"),
                UriPart::Outpost,
            ),
            (
                format!("trellis://hub.example:7443/a/?key={k}"),
                UriPart::Outpost,
            ),
            ("trellis://hub.example:7443/a".into(), UriPart::Key),
            ("trellis://hub.example:7443/a?key=".into(), UriPart::Key),
            (
                format!("trellis://hub.example:7443/a?key={k}="),
                UriPart::Key,
            ),
            (
                format!("trellis://hub.example:7443/a?key={}", &k[1..]),
                UriPart::Key,
            ),
            (
                format!("trellis://hub.example:7443/a?key={k}A"),
                UriPart::Key,
            ),
            (
                format!("trellis://hub.example:7443/a?key={}+", &k[..42]),
                UriPart::Key,
            ),
            (
                format!("trellis://hub.example:7443/a?key={k}&x=1"),
                UriPart::Query,
            ),
            (
                format!("trellis://hub.example:7443/a?secret={k}"),
                UriPart::Query,
            ),
            (format!("trellis://hub.example:7443/a?{k}"), UriPart::Query),
            (
                format!("trellis://hub.example:7443/a?key={k}#frag"),
                UriPart::Whole,
            ),
            (
                format!("trellis://hub.example:7443/a%62?key={k}"),
                UriPart::Whole,
            ),
            (
                format!("trellis://hüb.example:7443/a?key={k}"),
                UriPart::Whole,
            ),
            (
                format!("trellis://hub.example:7443/a?key=\u{0}{k}"),
                UriPart::Whole,
            ),
            (
                format!("trellis://hub.example:7443/a b?key={k}"),
                UriPart::Whole,
            ),
        ];
        for (input, part) in cases {
            let e = err(&input);
            assert_eq!(e.part, part, "{input:?}: {e}");
            assert!(e.to_string().contains("an Outpost URI looks like"), "{e}");
        }
    }

    #[test]
    fn non_canonical_key_is_rejected_so_each_key_has_one_spelling() {
        // The last character of a 32-byte key carries 4 bits; its low 2 bits
        // must be zero.
        let k = key().to_string();
        let last = k.as_bytes()[42];
        let tweaked = base64url::ALPHABET
            [(base64url::ALPHABET.iter().position(|&c| c == last).unwrap() | 1) % 64];
        let bad = format!("{}{}", &k[..42], tweaked as char);
        let e = err(&format!("trellis://hub.example:7443/a?key={bad}"));
        assert_eq!(e.part, UriPart::Key);
    }

    #[test]
    fn key_never_appears_in_errors_or_debug() {
        let k = key().to_string();
        let uri: OutpostUri = example().parse().unwrap();
        assert!(!format!("{uri:?}").contains(&k));
        let e = err(&format!("trellis://hub.example:7443/a?key={k}&x=1"));
        assert!(!e.to_string().contains(&k));
        let e = err(&format!("trellis://hub.example:7443/a?key={k}A"));
        assert!(!e.to_string().contains(&k));
    }

    #[test]
    fn link_key_equality() {
        let a = key();
        let mut bytes = *a.as_bytes();
        assert_eq!(a, LinkKey::from_bytes(bytes));
        bytes[31] ^= 1;
        assert_ne!(a, LinkKey::from_bytes(bytes));
        bytes[31] ^= 1;
        bytes[0] ^= 0x80;
        assert_ne!(a, LinkKey::from_bytes(bytes));
    }

    #[test]
    fn new_validates_and_normalises() {
        let uri = OutpostUri::new("HUB.example", 7443, "factory-7", key()).unwrap();
        assert_eq!(uri.to_string(), example());
        let uri = OutpostUri::new("[::1]", 7443, "a", key()).unwrap();
        assert_eq!(uri.host, "::1");
        let uri = OutpostUri::new("0:0::1", 7443, "a", key()).unwrap();
        assert_eq!(uri.authority(), "[::1]:7443");
        assert_eq!(
            OutpostUri::new("hub", 0, "a", key()).unwrap_err().part,
            UriPart::Port
        );
        assert_eq!(
            OutpostUri::new("hub", 1, "A", key()).unwrap_err().part,
            UriPart::Outpost
        );
        assert_eq!(
            OutpostUri::new("a b", 1, "a", key()).unwrap_err().part,
            UriPart::Host
        );
    }

    #[test]
    fn serde_uses_the_string_form() {
        let uri: OutpostUri = example().parse().unwrap();
        let json = serde_json::to_string(&uri).unwrap();
        assert_eq!(json, format!("\"{}\"", example()));
        let back: OutpostUri = serde_json::from_str(&json).unwrap();
        assert_eq!(back, uri);
        assert!(serde_json::from_str::<OutpostUri>("\"trellis://x\"").is_err());
    }

    fn dns_label() -> impl Strategy<Value = String> {
        "[a-z]([a-z0-9-]{0,20}[a-z0-9])?"
    }

    fn host() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::collection::vec(dns_label(), 1..4).prop_map(|l| l.join(".")),
            any::<[u8; 4]>().prop_map(|b| Ipv4Addr::from(b).to_string()),
            any::<[u8; 16]>().prop_map(|b| Ipv6Addr::from(b).to_string()),
        ]
    }

    fn uri() -> impl Strategy<Value = OutpostUri> {
        (
            host(),
            1u16..,
            "[a-z]([a-z0-9-]{0,30}[a-z0-9])?",
            any::<[u8; 32]>(),
        )
            .prop_map(|(host, port, outpost, key)| OutpostUri {
                host,
                port,
                outpost,
                key: LinkKey::from_bytes(key),
            })
    }

    proptest! {
        #[test]
        fn display_round_trips_through_parse(uri in uri()) {
            let text = uri.to_string();
            let back: OutpostUri = text.parse().unwrap();
            prop_assert_eq!(&back, &uri);
            prop_assert_eq!(back.to_string(), text);
        }

        #[test]
        fn key_encoding_round_trips(bytes in any::<[u8; 32]>()) {
            let text = LinkKey::from_bytes(bytes).to_string();
            prop_assert_eq!(text.len(), LINK_KEY_B64_LEN);
            let parsed: LinkKey = text.parse().unwrap();
            prop_assert_eq!(parsed.as_bytes(), &bytes);
        }

        #[test]
        fn arbitrary_strings_never_panic(s in any::<String>()) {
            let _ = s.parse::<OutpostUri>();
        }

        #[test]
        fn mutated_uris_never_panic(uri in uri(), at in any::<prop::sample::Index>(), c in any::<char>()) {
            let mut text = uri.to_string();
            let mut i = at.index(text.len() + 1);
            while !text.is_char_boundary(i) { i -= 1; }
            text.insert(i, c);
            if let Ok(parsed) = text.parse::<OutpostUri>() {
                // Whatever it parsed to must format to something that parses to the same.
                prop_assert_eq!(parsed.to_string().parse::<OutpostUri>().unwrap(), parsed);
            }
        }

        #[test]
        fn uri_alphabet_soup_never_panics(s in "[a-zA-Z0-9:/?=&@#%\\[\\]._~ -]{0,80}") {
            let _ = s.parse::<OutpostUri>();
        }
    }
}
