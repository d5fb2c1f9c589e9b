//! Unit tests of the whole parser on small inline manifests; the corpus of
//! realistic files lives in `tests/manifests`.

use super::*;

#[test]
fn placeholder() {
    assert!(parse_manifest("version: v1\ncomponents:\n  - name: web\n    docker:\n      image: nginx\n").is_ok());
}

