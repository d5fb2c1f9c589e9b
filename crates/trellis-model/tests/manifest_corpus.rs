//! The manifest parser against a corpus of realistic files.
//!
//! `tests/manifests/valid/` holds manifests that must parse; every file in
//! `tests/manifests/invalid/` must fail with exactly the errors listed in the
//! file of the same name plus `.expected`, one per line:
//!
//! ```text
//! LINE:COLUMN | FIELD PATH | fragment of the message
//! ```
//!
//! On a mismatch the test prints what the parser reported in that format, so
//! a new case can be written by running the test and checking the output by
//! eye.

use std::fs;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use trellis_model::manifest::{
    Arch, ComponentSource, DockerBuild, EnvSource, FileSource, MANIFEST_FILE_NAMES, Manifest,
    ManifestError, Schedule, StorageKind, parse_manifest,
};

fn corpus(kind: &str) -> Vec<(PathBuf, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/manifests")
        .join(kind);
    let mut files: Vec<(PathBuf, String)> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e != "expected"))
        .map(|p| {
            let text = fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect();
    files.sort();
    files
}

fn valid(name: &str) -> Manifest {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/manifests/valid")
        .join(name);
    let text = fs::read_to_string(&path).unwrap();
    parse_manifest(&text).unwrap_or_else(|e| panic!("{name}:\n{e}"))
}

fn broken(name: &str) -> Vec<ManifestError> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/manifests/invalid")
        .join(name);
    let text = fs::read_to_string(&path).unwrap();
    parse_manifest(&text).unwrap_err().0
}

fn as_expected_line(e: &ManifestError) -> String {
    format!("{}:{} | {} | {}", e.line, e.column, e.path, e.message)
}

struct Expected {
    line: usize,
    column: usize,
    path: String,
    fragment: String,
}

fn parse_expected(text: &str) -> Vec<Expected> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let mut parts = l.splitn(3, '|').map(str::trim);
            let (pos, path, fragment) = (
                parts.next().unwrap(),
                parts.next().expect("a path"),
                parts.next().expect("a message fragment"),
            );
            let (line, column) = pos.split_once(':').expect("LINE:COLUMN");
            Expected {
                line: line.parse().unwrap(),
                column: column.parse().unwrap(),
                path: path.to_owned(),
                fragment: fragment.to_owned(),
            }
        })
        .collect()
}

#[test]
fn every_valid_manifest_parses_and_survives_a_json_round_trip() {
    let files = corpus("valid");
    assert!(files.len() >= 25, "only {} valid manifests", files.len());
    for (path, text) in &files {
        let manifest = parse_manifest(text)
            .unwrap_or_else(|e| panic!("{} should parse:\n{e}", path.display()));
        let json = serde_json::to_string(&manifest).unwrap();
        let back: Manifest = serde_json::from_str(&json).unwrap();
        assert_eq!(back, manifest, "{}", path.display());
    }
}

#[test]
fn every_broken_manifest_reports_exactly_the_expected_errors() {
    let files = corpus("invalid");
    assert!(files.len() >= 25, "only {} broken manifests", files.len());
    let mut failures = Vec::new();
    for (path, text) in &files {
        let name = path.file_name().unwrap().to_string_lossy();
        let expected_path = path.with_file_name(format!("{name}.expected"));
        let expected = fs::read_to_string(&expected_path)
            .map(|t| parse_expected(&t))
            .unwrap_or_default();
        let actual = match parse_manifest(text) {
            Ok(_) => Vec::new(),
            Err(errors) => errors.0,
        };
        let matches = !actual.is_empty()
            && actual.len() == expected.len()
            && actual.iter().zip(&expected).all(|(a, e)| {
                a.line == e.line
                    && a.column == e.column
                    && a.path == e.path
                    && a.message.contains(&e.fragment)
            });
        if !matches {
            let got: Vec<String> = actual.iter().map(as_expected_line).collect();
            failures.push(format!(
                "{name}: expected ({}):\n{}\ngot:\n{}",
                expected_path.display(),
                expected
                    .iter()
                    .map(|e| format!("{}:{} | {} | {}", e.line, e.column, e.path, e.fragment))
                    .collect::<Vec<_>>()
                    .join("\n"),
                got.join("\n")
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
}

#[test]
fn the_file_names_cover_the_corpus_formats() {
    assert_eq!(MANIFEST_FILE_NAMES[0], "trellis.yaml");
    assert!(MANIFEST_FILE_NAMES.contains(&"pergola.yml"));
    assert!(MANIFEST_FILE_NAMES.contains(&"pergola.json"));
}

// === what the valid manifests mean ===

#[test]
fn webshop_decodes_into_the_typed_model() {
    let m = valid("webshop.trellis.yaml");
    assert_eq!(m.version, "v1");
    assert_eq!(
        m.component_names().collect::<Vec<_>>(),
        ["storefront", "api", "worker", "db", "migrate"]
    );

    let storefront = m.component("storefront").unwrap();
    let ComponentSource::Docker(docker) = &storefront.source else {
        panic!("storefront is a docker component")
    };
    let DockerBuild::Dockerfile {
        file,
        context,
        args,
    } = &docker.build
    else {
        panic!("storefront is built from a Dockerfile")
    };
    assert_eq!(file, "storefront/Dockerfile");
    assert_eq!(context.as_deref(), Some("storefront"));
    assert_eq!(args.get("NODE_VERSION").map(String::as_str), Some("22"));
    assert_eq!(storefront.ingresses.len(), 2);
    assert_eq!(storefront.ingresses[1].port, None);
    assert_eq!(storefront.resources.cpu.as_ref().unwrap().millicores, 500);
    assert_eq!(
        storefront.resources.memory.as_ref().unwrap().bytes,
        512 * 1024 * 1024
    );
    assert_eq!(storefront.scaling.map(|s| (s.min, s.max)), Some((2, 6)));
    assert!(!storefront.is_scheduled());

    let api = m.component("api").unwrap();
    assert_eq!(api.ports, [8080, 9090]);
    assert_eq!(api.ingresses[0].path.as_deref(), Some("/v1"));
    assert_eq!(
        api.env[3].source,
        EnvSource::Value("9090".into()),
        "numbers are kept as written"
    );
    assert_eq!(api.component_refs().collect::<Vec<_>>(), ["db"]);

    let worker = m.component("worker").unwrap();
    assert_eq!(
        worker.command.as_deref(),
        Some(&["/app/worker".to_owned()][..])
    );
    assert_eq!(worker.args.as_ref().unwrap()[3], "$DATABASE_HOST");
    assert_eq!(worker.scaling, None);

    let db = m.component("db").unwrap();
    assert_eq!(db.storage[0].kind, StorageKind::Premium);
    assert_eq!(db.storage[0].size.as_ref().unwrap().bytes, 20 << 30);

    let migrate = m.component("migrate").unwrap();
    assert!(migrate.is_scheduled());
    assert_eq!(migrate.scheduled, Some(Schedule::OnRelease));
    assert_eq!(migrate.max_retries, Some(3));
    assert!(m.component("nope").is_none());
}

#[test]
fn config_ref_with_a_value_is_a_config_ref_with_a_default() {
    let m = valid("config-defaults.yaml");
    let env = &m.components[0].env;
    assert_eq!(
        env[0].source,
        EnvSource::ConfigRef {
            key: "feature-flags".into(),
            default: Some("search,checkout".into())
        }
    );
    assert_eq!(
        env[1].source,
        EnvSource::ConfigRef {
            key: "workers".into(),
            default: Some("4".into())
        }
    );
    assert_eq!(
        env[2].source,
        EnvSource::ConfigRef {
            key: "debug".into(),
            default: Some("false".into())
        }
    );
    assert_eq!(
        env[3].source,
        EnvSource::ConfigRef {
            key: "sentry-dsn".into(),
            default: None
        }
    );
}

#[test]
fn json_manifests_parse_like_yaml() {
    let m = valid("blog.pergola.json");
    let blog = m.component("blog").unwrap();
    assert!(blog.ingresses[0].sticky);
    assert_eq!(blog.resources.cpu.as_ref().unwrap().millicores, 500);
    assert_eq!(
        blog.env[3].source,
        EnvSource::ConfigRef {
            key: "public-url".into(),
            default: Some("https://blog.example.net".into())
        }
    );
    let ComponentSource::Docker(mysql) = &m.component("mysql").unwrap().source else {
        panic!()
    };
    assert_eq!(mysql.platforms, [Arch::Amd64]);
}

#[test]
fn process_components_keep_path_and_command() {
    let m = valid("sensor-edge.yaml");
    let bridge = m.component("sensor-bridge").unwrap();
    assert!(bridge.is_process());
    let ComponentSource::Process(p) = &bridge.source else {
        panic!()
    };
    assert_eq!(p.path, "./bin");
    assert_eq!(p.command, ["./sensor-bridge", "--port", "7000"]);
    let ComponentSource::Process(collector) = &m.component("collector").unwrap().source else {
        panic!()
    };
    assert_eq!(collector.command.len(), 5);
}

#[test]
fn schedules_and_time_zones() {
    let m = valid("nightly-report.yaml");
    let report = m.component("report").unwrap();
    assert_eq!(report.scheduled, Some(Schedule::Cron("0 3 * * 1-5".into())));
    assert_eq!(report.scheduled_timezone.as_deref(), Some("Europe/Zurich"));
    let cleanup = m.component("cleanup").unwrap();
    assert_eq!(
        cleanup.scheduled,
        Some(Schedule::Cron("*/5 * * * *".into()))
    );
    assert_eq!(cleanup.storage[0].kind, StorageKind::Temporary);
    assert_eq!(cleanup.storage[0].size.as_ref().unwrap().text, "1Gi");
}

#[test]
fn files_hold_content_or_a_config_ref() {
    let m = valid("files.yaml");
    let files = &m.component("proxy").unwrap().files;
    assert_eq!(
        files[0].source,
        FileSource::Content(":80 {\n  reverse_proxy app:8000\n}\n".into())
    );
    assert_eq!(
        files[1].source,
        FileSource::ConfigRef {
            key: "tls-cert".into(),
            default: None
        }
    );
    assert_eq!(files[2].source, FileSource::Content(String::new()));
}

#[test]
fn anchors_and_merge_keys_share_settings() {
    let m = valid("anchors.yaml");
    let (api, jobs) = (&m.components[0], &m.components[1]);
    assert_eq!(api.source, jobs.source);
    assert_eq!(api.env, jobs.env);
    assert_eq!(jobs.resources.cpu.as_ref().unwrap().millicores, 250);
    assert_eq!(jobs.resources.memory.as_ref().unwrap().text, "512Mi");
}

#[test]
fn empty_optional_fields_count_as_absent() {
    let m = valid("minimal.yaml");
    let app = &m.components[0];
    assert!(app.ports.is_empty() && app.env.is_empty());
    assert_eq!(app.command, None);
}

#[test]
fn quantities_keep_text_and_value() {
    let m = valid("resources.yaml");
    let got: Vec<(u64, u64)> = m
        .components
        .iter()
        .map(|c| {
            (
                c.resources.cpu.as_ref().map_or(0, |q| q.millicores),
                c.resources.memory.as_ref().map_or(0, |q| q.bytes),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (100, 64 << 20),
            (500, 1_000_000_000),
            (2000, 4 << 30),
            (1500, 1_000_000),
            (0, 129_000_000)
        ]
    );
}

// === the platform's shapes ===

fn docker(m: &Manifest, component: &str) -> trellis_model::manifest::DockerSource {
    match &m.component(component).unwrap().source {
        ComponentSource::Docker(d) => d.clone(),
        ComponentSource::Process(_) => panic!("{component} is a docker component"),
    }
}

#[test]
fn platform_lists_and_build_arg_lists_decode() {
    let m = valid("multi-arch-edge.pergola.yml");
    let bridge = docker(&m, "camera-bridge");
    assert_eq!(bridge.platforms, [Arch::Amd64, Arch::Arm64]);
    let DockerBuild::Dockerfile {
        file,
        context,
        args,
    } = &bridge.build
    else {
        panic!("built from a Dockerfile")
    };
    assert_eq!(file, "edge/camera-bridge/Dockerfile");
    assert_eq!(context.as_deref(), Some("edge/camera-bridge"));
    assert_eq!(args.get("RUST_VERSION").map(String::as_str), Some("1.95"));
    assert_eq!(args.get("FEATURES").map(String::as_str), Some("v4l2,rtsp"));
    assert_eq!(
        docker(&m, "inference").platforms,
        [Arch::Arm64, Arch::Amd64]
    );
    let json = valid("iot-pipeline.pergola.json");
    assert_eq!(docker(&json, "mqtt").platforms, [Arch::Amd64, Arch::Arm64]);
    // The shapes of earlier Trellis versions.
    let legacy = valid("build-args.yaml");
    let frontend = docker(&legacy, "frontend");
    assert_eq!(frontend.platforms, [Arch::Amd64]);
    let DockerBuild::Dockerfile { args, .. } = &frontend.build else {
        panic!("built from a Dockerfile")
    };
    assert_eq!(args.get("NODE_MAJOR").map(String::as_str), Some("22"));
}

#[test]
fn dependent_variables_are_kept_as_written_for_the_outpost_to_expand() {
    let m = valid("dependent-vars.yaml");
    let api = m.component("orders-api").unwrap();
    let value = |name: &str| {
        api.env
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.source.clone())
            .unwrap()
    };
    assert_eq!(
        value("DATABASE_URL"),
        EnvSource::Value(
            "postgresql://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@$(DB_HOST):$(DB_PORT)/orders?sslmode=disable".into()
        )
    );
    assert_eq!(value("DB_PORT"), EnvSource::Value("5432".into()));
    assert_eq!(
        value("SELF_HOST"),
        EnvSource::ComponentRef("orders-api".into()),
        "a component may name itself"
    );
    assert!(api.args.as_ref().unwrap()[0].contains("$(date -u +%FT%TZ)"));
}

#[test]
fn identities_schedules_and_file_defaults_are_kept() {
    let m = valid("identity-jobs.yaml");
    let exporter = m.component("exporter").unwrap();
    assert_eq!(exporter.identity.as_deref(), Some("reports-bucket-writer"));
    assert_eq!(
        exporter.scheduled,
        Some(Schedule::Cron("25 7 * 12 *".into()))
    );
    assert_eq!(exporter.max_retries, Some(0));
    let api = m.component("api").unwrap();
    assert_eq!(api.ingresses[0].path.as_deref(), Some("/"));
    assert!(api.ingresses[0].sticky);

    let kasse = valid("yaml-styles.pergola.yaml");
    let kassa = &kasse.components[0];
    assert_eq!(
        kassa.files[1].source,
        FileSource::ConfigRef {
            key: "kasse-settings.json".into(),
            default: Some("{\"currency\": \"EUR\"}\n".into())
        }
    );
    let value = |name: &str| {
        kassa
            .env
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.source.clone())
            .unwrap()
    };
    assert_eq!(value("WORKERS"), EnvSource::Value("1".into()));
    assert_eq!(value("DEBUG"), EnvSource::Value("false".into()));
    assert_eq!(value("RATIO"), EnvSource::Value("1.5".into()));
    assert_eq!(
        value("GRUSS"),
        EnvSource::Value("Grüß Gott, schön dass Sie da sind — 👋".into())
    );
    assert_eq!(kassa.user.as_deref(), Some("1000"));
    assert_eq!(kassa.resources.memory.as_ref().unwrap().bytes, 500_000_000);
    assert_eq!(kassa.ingresses[1].path.as_deref(), Some("/admin"));
}

#[test]
fn storage_sizes_and_several_volumes_per_component() {
    let m = valid("iot-pipeline.pergola.json");
    let influx = m.component("influxdb").unwrap();
    let sizes: Vec<(&str, u64, StorageKind)> = influx
        .storage
        .iter()
        .map(|s| (s.name.as_str(), s.size.as_ref().unwrap().bytes, s.kind))
        .collect();
    assert_eq!(
        sizes,
        [
            ("influx", 100 << 30, StorageKind::Premium),
            ("influx-config", 100 << 20, StorageKind::Standard)
        ]
    );
    let ml = valid("ml-inference.pergola.yaml");
    let gateway = ml.component("gateway").unwrap();
    assert_eq!(gateway.resources.cpu.as_ref().unwrap().millicores, 500);
    assert_eq!(gateway.resources.memory.as_ref().unwrap().bytes, 512 << 20);
    assert_eq!(gateway.ingresses.len(), 3);
    assert_eq!(gateway.scaling.map(|s| (s.min, s.max)), Some((0, 10)));
}

// === what the broken manifests say (beyond the .expected files) ===

#[test]
fn errors_display_with_line_column_and_path() {
    let errors = broken("env-none.yaml");
    assert_eq!(
        errors[0].to_string(),
        format!(
            "line 9, column 9: components[0].env[1]: {}",
            errors[0].message
        )
    );
    let text = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/manifests/invalid/many-errors.yaml"),
    )
    .unwrap();
    let all = parse_manifest(&text).unwrap_err();
    assert_eq!(all.to_string().lines().count(), all.len());
    let positions: Vec<(usize, usize)> = all.iter().map(|e| (e.line, e.column)).collect();
    let mut sorted = positions.clone();
    sorted.sort();
    assert_eq!(positions, sorted, "errors come in source order");
}

#[test]
fn component_ref_errors_list_the_components_there_are() {
    let errors = broken("component-ref-missing.yaml");
    assert_eq!(
        errors[0].message,
        "component-ref \"db\" names no component in this manifest; components are: web, worker"
    );
}

#[test]
fn port_errors_say_the_valid_range() {
    let errors = broken("port-out-of-range.yaml");
    assert_eq!(errors[0].message, "0 is not a port; use 1-65535");
    assert_eq!(errors[1].message, "70000 is not a port; use 1-65535");
}

// === robustness ===

/// Every prefix of every corpus file is parsed: none may panic, and every
/// error must have a position inside the text.
#[test]
fn truncated_manifests_never_panic() {
    for (path, text) in corpus("valid").into_iter().chain(corpus("invalid")) {
        for (cut, _) in text.char_indices() {
            let prefix = &text[..cut];
            if let Err(errors) = parse_manifest(prefix) {
                assert!(!errors.is_empty(), "{} cut at {cut}", path.display());
                let lines = prefix.lines().count().max(1) + 1;
                for e in &errors {
                    assert!(
                        e.line >= 1 && e.line <= lines && e.column >= 1,
                        "{} cut at {cut}: {e}",
                        path.display()
                    );
                }
            }
        }
    }
}

fn seed_texts() -> Vec<String> {
    corpus("valid").into_iter().map(|(_, t)| t).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Garbles a valid manifest by splicing in YAML-significant characters.
    #[test]
    fn garbled_manifests_never_panic(
        seed in 0usize..1000,
        edits in prop::collection::vec((any::<prop::sample::Index>(), "[-:\\[\\]{}&*!|>'\"#%@`, \n\t0-9a-z~.\\\\]{0,6}"), 1..8),
    ) {
        let seeds = seed_texts();
        let mut text = seeds[seed % seeds.len()].clone();
        for (at, insert) in edits {
            let boundaries: Vec<usize> =
                text.char_indices().map(|(i, _)| i).chain([text.len()]).collect();
            let at = boundaries[at.index(boundaries.len())];
            text.insert_str(at, &insert);
        }
        let _ = parse_manifest(&text);
    }

    /// Arbitrary text, including control characters and non-ASCII.
    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
        let _ = parse_manifest(&text);
    }
}

#[test]
fn devices_are_named_as_the_outpost_offers_them() {
    let m = valid("line-devices.yaml");
    let names = |c: &str| {
        m.component(c)
            .unwrap()
            .device_names()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(names("inspect"), ["camera", "gpu"]);
    assert_eq!(
        names("plc-bridge"),
        ["plc-serial"],
        "process components too"
    );
    assert!(m.component("plc-bridge").unwrap().is_process());
    assert_eq!(names("calibrate"), ["camera"], "scheduled components too");
    assert!(names("report").is_empty(), "an empty list asks for nothing");
    // Manifests without devices serialise as before (no `devices` key), so
    // recorded builds and API answers do not change.
    let json = serde_json::to_value(m.component("report").unwrap()).unwrap();
    assert!(json.get("devices").is_none(), "{json}");
}
