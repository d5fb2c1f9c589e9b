//! The Outpost URI parser (`OutpostUri: FromStr`) on arbitrary text.
//!
//! Besides "never panics", it checks what the module documents:
//! - a parsed URI's `Display` is canonical: it parses back to an equal
//!   value and formats to the same text, and `OutpostUri::new` accepts the
//!   parts and builds the same value;
//! - the link key is never in `Debug` output, nor in an error about a URI
//!   of the shape `…?key=KEY`;
//! - a link key has one spelling: a string that parses as a `LinkKey`
//!   formats back to itself.

#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_model::outpost_uri::{LinkKey, OutpostUri};

/// base64url without padding: the characters a key is written in.
fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// The key of an input shaped `PREFIX?key=KEY`, where PREFIX has no other
/// `?` and does not contain KEY, and KEY is long enough not to occur in the
/// error's fixed wording by chance. The parser reads exactly this KEY as the
/// key, and quotes only parts of PREFIX in its errors.
fn key_of(text: &str) -> Option<&str> {
    let (prefix, key) = text.trim().rsplit_once("?key=")?;
    let plausible = key.len() >= 12 && key.chars().all(is_key_char);
    (plausible && !prefix.contains('?') && !prefix.contains(key)).then_some(key)
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };

    if let Ok(key) = text.parse::<LinkKey>() {
        assert_eq!(key.to_string(), text, "a link key with two spellings");
    }

    match text.parse::<OutpostUri>() {
        Ok(uri) => {
            let canonical = uri.to_string();
            let again: OutpostUri = canonical
                .parse()
                .unwrap_or_else(|e| panic!("{canonical:?} (from {text:?}) does not parse: {e}"));
            assert_eq!(again, uri, "{canonical:?} parses to another URI");
            assert_eq!(again.to_string(), canonical);

            let built = OutpostUri::new(&uri.host, uri.port, &uri.outpost, uri.key.clone())
                .unwrap_or_else(|e| {
                    panic!("OutpostUri::new refuses the parts of {canonical:?}: {e}")
                });
            assert_eq!(built, uri);

            let key = uri.key.to_string();
            if !uri.host.contains(&key) && !uri.outpost.contains(&key) {
                assert!(!format!("{uri:?}").contains(&key), "Debug shows the key");
            }
        }
        Err(err) => {
            if let Some(key) = key_of(text) {
                assert!(
                    !err.to_string().contains(key),
                    "the error shows the key: {err}"
                );
                assert!(
                    !format!("{err:?}").contains(key),
                    "the error shows the key: {err:?}"
                );
            }
        }
    }
});
