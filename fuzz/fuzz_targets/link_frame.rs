//! The link frame decoder (`trellis_link::decode`) on arbitrary bytes.
//!
//! Besides "never panics", it checks that whatever decodes re-encodes to a
//! frame that decodes to the same envelope, and that every error stays
//! short (reasons are cut so a hostile frame cannot flood the logs).

#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_link::{FrameError, decode, encode};

fuzz_target!(|data: &[u8]| {
    match decode(data) {
        Ok(envelope) => {
            let bytes = match encode(&envelope) {
                Ok(bytes) => bytes,
                // Re-encoding may be longer than the input (`1e2` becomes
                // `100.0`), so a frame near the limit may not fit again.
                Err(FrameError::TooLarge { .. }) => return,
                Err(e) => panic!("a decoded envelope does not encode: {e}"),
            };
            let again = decode(&bytes).unwrap_or_else(|e| {
                panic!("{} does not decode: {e}", String::from_utf8_lossy(&bytes))
            });
            assert_eq!(again, envelope);
        }
        Err(e) => {
            assert!(!e.code().is_empty());
            let message = e.to_string();
            assert!(message.len() < 1000, "error too long: {message}");
        }
    }
});
