//! The manifest parser (`parse_manifest`) on arbitrary text.
//!
//! Besides "never panics" (the YAML loader's own `catch_unwind` does not
//! hide a panic here: libFuzzer's panic hook aborts first), it checks the
//! documented shape of the result:
//! - a valid manifest has version `v1` and at least one component, with
//!   unique names, and survives a JSON round trip (the hub stores and
//!   serves it as JSON);
//! - a failure has at least one error, each at a 1-based line and column,
//!   in source order.

#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use trellis_model::manifest::{MANIFEST_VERSION, Manifest, parse_manifest};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_manifest(text) {
        Ok(manifest) => {
            assert_eq!(manifest.version, MANIFEST_VERSION);
            assert!(!manifest.components.is_empty());
            let mut names = HashSet::new();
            for name in manifest.component_names() {
                assert!(names.insert(name), "component {name:?} twice");
            }
            let json = serde_json::to_string(&manifest).expect("a manifest serializes");
            let back: Manifest = serde_json::from_str(&json)
                .unwrap_or_else(|e| panic!("{json} does not deserialize: {e}"));
            assert_eq!(back, manifest);
        }
        Err(errors) => {
            assert!(!errors.is_empty(), "a failure without errors");
            for e in &errors {
                assert!(e.line >= 1 && e.column >= 1, "{e}");
            }
            let positions: Vec<_> = errors.iter().map(|e| (e.line, e.column)).collect();
            assert!(positions.is_sorted(), "errors out of order: {errors}");
            let _ = errors.to_string();
        }
    }
});
