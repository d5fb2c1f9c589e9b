//! The artifact index decoder (`ArtifactIndex::parse`) on arbitrary bytes.
//!
//! The index is stored as a chunk and named by its digest, so the target
//! names each input by its own digest, as the store would. Besides "never
//! panics", it checks that an accepted index is consistent (format, chunk
//! sizes adding up), serializes back to bytes that parse to the same index,
//! and that `distinct_chunks` keeps each chunk once, in first-use order.

#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use trellis_cas::{ArtifactIndex, Digest, INDEX_FORMAT};

fuzz_target!(|data: &[u8]| {
    let digest = Digest::of(data);
    match ArtifactIndex::parse(&digest, data) {
        Ok(index) => {
            assert_eq!(index.format, INDEX_FORMAT);
            let total = index
                .chunks
                .iter()
                .try_fold(0u64, |sum, c| sum.checked_add(c.size));
            assert_eq!(total, Some(index.size));

            let bytes = index.to_bytes();
            let again = ArtifactIndex::parse(&Digest::of(&bytes), &bytes)
                .unwrap_or_else(|e| panic!("a serialized index does not parse: {e}"));
            assert_eq!(again, index);

            let distinct = index.distinct_chunks();
            let mut seen = HashSet::new();
            assert!(distinct.iter().all(|c| seen.insert(c.digest)));
            let mut expected = Vec::new();
            let mut seen = HashSet::new();
            for c in &index.chunks {
                if seen.insert(c.digest) {
                    expected.push(*c);
                }
            }
            assert_eq!(distinct, expected);
        }
        Err(e) => {
            let message = e.to_string();
            assert!(message.contains(&digest.as_hex()), "{message}");
        }
    }
});
