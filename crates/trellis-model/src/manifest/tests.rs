//! Unit tests of the whole parser on small inline manifests; the corpus of
//! realistic files lives in `tests/manifests`.

use super::*;

#[test]
fn placeholder() {
    assert!(parse_manifest("version: v1\ncomponents:\n  - name: web\n    docker:\n      image: nginx\n").is_ok());
}

#[test]
fn explore() {
    for t in [
        "version: v1\ncomponents:\n  - name: job\n    scheduled: @release\n",
        "version: v1\ncomponents:\n  - name: job\n    scheduled: */5 * * * *\n",
        "version: v1\ncomponents:\n  - name: job\n    scheduled: `x`\n",
        "version: v1\ncomponents:\n  - name: job\n    env:\n      - name: A\n         value: 1\n",
        "{\"version\": \"v1\", \"components\": [ {\"name\": \"a\",, } ]}",
        "{\"version\": \"v1\",\n \"components\": [\n {\"name\": \"a\" \"x\": 1} ]}",
        "version: v1\ncomponents:\n\t- name: job\n",
        "version: v1\ncomponents: [a, b\n",
        "version: v1\ncomponents:\n  - name: a\n    docker: {image: x}\n  - 'unterminated\n",
    ] {
        eprintln!("----\n{t}\n=> {:?}", parse_manifest(t).map(|_| ()).map_err(|e| e.to_string()));
    }
}
