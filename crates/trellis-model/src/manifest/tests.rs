//! Unit tests of the whole parser on small inline manifests, for the rules
//! the realistic corpus in `tests/manifests` does not reach.

use super::*;

/// Wraps component YAML (indented as a list item under `components:`) into a
/// manifest, so each test shows only what it is about.
fn with_components(body: &str) -> String {
    format!("version: v1\ncomponents:\n{body}")
}

fn errors(text: &str) -> Vec<(String, usize, usize, String)> {
    match parse_manifest(text) {
        Ok(m) => panic!("expected errors, parsed {m:#?}"),
        Err(e) => {
            e.0.into_iter()
                .map(|e| (e.path, e.line, e.column, e.message))
                .collect()
        }
    }
}

fn single(text: &str) -> (String, usize, usize, String) {
    let mut all = errors(text);
    assert_eq!(all.len(), 1, "{all:#?}");
    all.remove(0)
}

#[test]
fn a_minimal_manifest_parses() {
    let m = parse_manifest(&with_components(
        "  - name: web\n    docker:\n      image: nginx:1.27\n",
    ))
    .unwrap();
    assert_eq!(m.version, "v1");
    let web = m.component("web").unwrap();
    assert_eq!(
        web.source,
        ComponentSource::Docker(DockerSource {
            build: DockerBuild::Image("nginx:1.27".into()),
            platforms: Vec::new()
        })
    );
    assert!(!web.is_scheduled() && !web.is_process());
    assert_eq!(web.resources, Resources::default());
}

#[test]
fn config_ref_plus_value_is_a_default() {
    let m = parse_manifest(&with_components(
        "  - name: web\n    docker: {image: x}\n    env:\n      - {name: MODE, config-ref: mode, value: fast}\n",
    ))
    .unwrap();
    assert_eq!(
        m.components[0].env[0].source,
        EnvSource::ConfigRef {
            key: "mode".into(),
            default: Some("fast".into())
        }
    );
}

#[test]
fn empty_and_comment_only_documents_say_what_a_manifest_needs() {
    for text in ["", "   \n", "# nothing yet\n", "\u{feff}"] {
        let (path, line, column, message) = single(text);
        assert_eq!((path.as_str(), line, column), ("", 1, 1));
        assert!(message.contains("version: v1"), "{message}");
    }
}

#[test]
fn a_document_that_is_not_a_mapping_is_refused() {
    let (path, line, _, message) = single("- web\n- api\n");
    assert_eq!((path.as_str(), line), ("", 1));
    assert!(message.contains("found a list"), "{message}");
}

#[test]
fn a_byte_order_mark_does_not_shift_columns() {
    let (_, line, column, _) =
        single("\u{feff}version: v2\ncomponents: [{name: a, docker: {image: x}}]\n");
    assert_eq!((line, column), (1, 10));
}

#[test]
fn every_error_is_collected_in_source_order() {
    let text = with_components(concat!(
        "  - name: b\n",                             // 3
        "    docker: {image: x}\n",                  // 4
        "    env: [{name: X, component-ref: zz}]\n", // 5
        "    ports: [0]\n",                          // 6
        "  - name: a\n",                             // 7
        "    process: {path: /abs, command: [x]}\n", // 8
    ));
    let lines: Vec<usize> = errors(&text).iter().map(|e| e.1).collect();
    assert_eq!(lines, [5, 6, 8]);
}

#[test]
fn a_missing_field_is_reported_at_the_mapping_that_lacks_it() {
    let (path, line, column, message) = single(&with_components(
        "  - name: web\n    docker: {image: x}\n    storage:\n      - path: /data\n        size: 1Gi\n",
    ));
    assert_eq!(
        (path.as_str(), line, column),
        ("components[0].storage[0]", 6, 9)
    );
    assert!(
        message.starts_with("missing required field name"),
        "{message}"
    );
}

#[test]
fn a_required_field_without_a_value_is_reported_at_its_key() {
    let (path, line, column, message) =
        single(&with_components("  - name:\n    docker: {image: x}\n"));
    assert_eq!((path.as_str(), line, column), ("components[0].name", 3, 5));
    assert!(message.contains("has no value"), "{message}");
}

#[test]
fn quoted_numbers_get_a_hint() {
    let (path, _, _, message) = single(&with_components(
        "  - name: web\n    docker: {image: x}\n    ports: [\"8080\"]\n",
    ));
    assert_eq!(path, "components[0].ports[0]");
    assert!(message.contains("without quotes"), "{message}");
}

#[test]
fn wrong_scalar_types_name_what_was_found() {
    let all = errors(&with_components(concat!(
        "  - name: web\n",
        "    docker: {image: x}\n",
        "    ports: [80, 1.5, {a: 1}]\n",
        "    ingresses: [{host: a, sticky: yes}]\n",
        "    scaling: {min: one, max: 2}\n",
        "    command: [run, [nested]]\n",
    )));
    let got: Vec<(&str, &str)> = all
        .iter()
        .map(|(p, _, _, m)| (p.as_str(), m.as_str()))
        .collect();
    assert!(got[0].0 == "components[0].ports[1]" && got[0].1.contains("the text \"1.5\""));
    assert!(got[1].0 == "components[0].ports[2]" && got[1].1.contains("found a mapping"));
    assert!(got[2].0 == "components[0].ingresses[0].sticky" && got[2].1.contains("true or false"));
    assert!(got[3].0 == "components[0].scaling.min" && got[3].1.contains("the text \"one\""));
    assert!(got[4].0 == "components[0].command[1]" && got[4].1.contains("found a list"));
    assert_eq!(got.len(), 5, "{got:#?}");
}

#[test]
fn an_ingress_needs_a_port_to_route_to() {
    let (path, line, _, message) = single(&with_components(
        "  - name: web\n    docker: {image: x}\n    ingresses:\n      - host: web\n",
    ));
    assert_eq!((path.as_str(), line), ("components[0].ingresses[0]", 6));
    assert!(message.contains("lists no ports"), "{message}");
}

#[test]
fn docker_needs_exactly_one_of_image_and_file() {
    let (path, _, _, message) = single(&with_components(
        "  - name: web\n    docker: {image: x, file: Dockerfile}\n",
    ));
    assert_eq!(path, "components[0].docker");
    assert!(message.contains("both image and file"), "{message}");
}

#[test]
fn build_settings_do_not_apply_to_a_ready_image() {
    let all = errors(&with_components(
        "  - name: web\n    docker: {image: x, build-context: ., build-args: {A: b}}\n",
    ));
    let paths: Vec<&str> = all.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        paths,
        [
            "components[0].docker.build-context",
            "components[0].docker.build-args"
        ]
    );
}

#[test]
fn build_args_keep_values_as_text_and_refuse_duplicates() {
    let m = parse_manifest(&with_components(
        "  - name: web\n    docker:\n      file: Dockerfile\n      build-args: {N: 22, B: true}\n",
    ))
    .unwrap();
    let ComponentSource::Docker(DockerSource {
        build: DockerBuild::Dockerfile { args, .. },
        ..
    }) = &m.components[0].source
    else {
        panic!()
    };
    assert_eq!(args["N"], "22");
    assert_eq!(args["B"], "true");

    let (path, ..) = single(&with_components(
        "  - name: web\n    docker:\n      file: Dockerfile\n      build-args: {N: 1, N: 2}\n",
    ));
    assert_eq!(path, "components[0].docker.build-args.N");
}

#[test]
fn a_component_may_refer_to_itself() {
    let m = parse_manifest(&with_components(
        "  - name: web\n    docker: {image: x}\n    env: [{name: SELF, component-ref: web}]\n",
    ))
    .unwrap();
    assert_eq!(
        m.components[0].env[0].source,
        EnvSource::ComponentRef("web".into())
    );
    assert_eq!(
        m.components[0].component_refs().collect::<Vec<_>>(),
        ["web"]
    );
}

#[test]
fn env_names_and_file_paths_are_unique_per_component() {
    let all = errors(&with_components(concat!(
        "  - name: web\n",
        "    docker: {image: x}\n",
        "    env: [{name: A, value: 1}, {name: A, value: 2}]\n",
        "    files: [{path: /a, content: x}, {path: /a, config-ref: k}]\n",
    )));
    let paths: Vec<&str> = all.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        paths,
        ["components[0].env[1].name", "components[0].files[1].path"]
    );
}

#[test]
fn env_with_every_source_names_them_all() {
    let (path, _, _, message) = single(&with_components(
        "  - name: web\n    docker: {image: x}\n    env: [{name: A, value: 1, config-ref: k, component-ref: web2}]\n  - name: web2\n    docker: {image: x}\n",
    ));
    assert_eq!(path, "components[0].env[0]");
    assert!(
        message.contains("together with value and config-ref"),
        "{message}"
    );
}

#[test]
fn an_env_value_or_file_content_left_empty_is_empty_text() {
    let m = parse_manifest(&with_components(concat!(
        "  - name: web\n",
        "    docker: {image: x}\n",
        "    env: [{name: A, value: }, {name: B, value: ~}, {name: C, config-ref: k, value: null}]\n",
        "    files: [{path: /a, content: }]\n",
    )))
    .unwrap();
    let env = &m.components[0].env;
    assert_eq!(env[0].source, EnvSource::Value(String::new()));
    assert_eq!(env[1].source, EnvSource::Value(String::new()));
    assert_eq!(
        env[2].source,
        EnvSource::ConfigRef {
            key: "k".into(),
            default: Some(String::new())
        }
    );
    assert_eq!(
        m.components[0].files[0].source,
        FileSource::Content(String::new())
    );
}

#[test]
fn values_must_not_be_null_where_a_name_is_needed() {
    let (path, _, _, message) = single(&with_components(
        "  - name: web\n    docker: {image: x}\n    env: [{name: A, config-ref: }]\n",
    ));
    assert_eq!(path, "components[0].env[0].config-ref");
    assert!(message.contains("found no value"), "{message}");
}

#[test]
fn scaling_needs_both_bounds() {
    let (path, _, _, message) = single(&with_components(
        "  - name: web\n    docker: {image: x}\n    scaling: {min: 1}\n",
    ));
    assert_eq!(path, "components[0].scaling");
    assert!(message.contains("missing required field max"), "{message}");
}

#[test]
fn schedules_accept_cron_nicknames_and_release() {
    let m = parse_manifest(&with_components(
        "  - name: a\n    docker: {image: x}\n    scheduled: '@hourly'\n  - name: b\n    docker: {image: x}\n    scheduled: \"@release\"\n",
    ))
    .unwrap();
    assert_eq!(
        m.components[0].scheduled,
        Some(Schedule::Cron("@hourly".into()))
    );
    assert_eq!(m.components[1].scheduled, Some(Schedule::OnRelease));
    assert_eq!(
        m.components[1].scheduled.as_ref().unwrap().to_string(),
        "@release"
    );
}

#[test]
fn unquoted_cron_gets_a_quoting_hint() {
    let (path, line, column, message) = single(&with_components(
        "  - name: a\n    docker: {image: x}\n    scheduled: */5 * * * *\n",
    ));
    assert_eq!((path.as_str(), line, column), ("", 5, 16));
    assert!(message.contains("quote it"), "{message}");
}

#[test]
fn counts_must_fit() {
    let (path, _, _, message) = single(&with_components(
        "  - name: a\n    docker: {image: x}\n    max-retries: 99999999999\n",
    ));
    assert_eq!(path, "components[0].max-retries");
    assert!(message.contains("too large"), "{message}");
}

#[test]
fn keys_must_be_names() {
    let (path, line, _, message) = single(&with_components(
        "  - name: a\n    docker: {image: x}\n    ? [x]\n    : 1\n",
    ));
    assert_eq!((path.as_str(), line), ("components[0]", 5));
    assert!(message.contains("a key must be a name"), "{message}");
}

#[test]
fn two_documents_are_refused() {
    let (path, line, _, message) =
        single("version: v1\ncomponents: [{name: a, docker: {image: x}}]\n---\nversion: v1\n");
    assert_eq!((path.as_str(), line), ("", 3));
    assert!(message.contains("single document"), "{message}");
}

#[test]
fn unknown_fields_suggest_the_closest_one() {
    let (path, line, column, message) = single(&with_components(
        "  - name: a\n    docker: {image: x}\n    scheduled_timezone: UTC\n",
    ));
    assert_eq!(
        (path.as_str(), line, column),
        ("components[0].scheduled_timezone", 5, 5)
    );
    assert!(
        message.contains("did you mean scheduled-timezone?"),
        "{message}"
    );
}

#[test]
fn errors_display_one_per_line_with_position_and_path() {
    let errors = parse_manifest("version: v1\ncomponents: []\nextra: 1\n").unwrap_err();
    let text = errors.to_string();
    assert_eq!(
        text,
        "line 2, column 13: components: the list is empty; a manifest needs at least one component\n\
         line 3, column 1: extra: unknown field \"extra\"; the fields here are: version, components"
    );
    let as_error: &dyn std::error::Error = &errors;
    assert!(as_error.to_string().contains("line 3"));
}

#[test]
fn the_stored_json_mirrors_the_manifest_words() {
    let m = parse_manifest(&with_components(concat!(
        "  - name: web\n",
        "    docker: {image: x}\n",
        "    env: [{name: A, config-ref: k, value: d}, {name: B, component-ref: db}]\n",
        "    storage: [{name: data, path: /data, size: 64Mi, type: memory}]\n",
        "  - name: db\n",
        "    process: {path: ., command: [./db]}\n",
        "    scheduled: '@release'\n",
    )))
    .unwrap();
    let json = serde_json::to_value(&m).unwrap();
    let web = &json["components"][0];
    assert_eq!(web["env"][0]["source"]["config-ref"]["default"], "d");
    assert_eq!(web["env"][1]["source"]["component-ref"], "db");
    assert_eq!(web["storage"][0]["type"], "memory");
    assert_eq!(web["source"]["docker"]["build"]["image"], "x");
    assert_eq!(json["components"][1]["scheduled"], "on-release");
    let back: Manifest = serde_json::from_value(json).unwrap();
    assert_eq!(back, m);
}

/// Inputs that sent earlier saphyr-parser releases into an endless loop
/// (saphyr-rs/saphyr-parser#13); the hub parses manifests users push, so a
/// hang here would be a denial of service.
#[test]
fn inputs_that_once_hung_the_parser_fail_promptly() {
    for text in [
        "{---", "[---", "{...", "- {---", "a: {---", "...", "--- ...",
    ] {
        assert!(parse_manifest(text).is_err(), "{text:?}");
    }
}

// === the platform's shapes ===

#[test]
fn build_args_are_a_list_of_name_and_value() {
    let m = parse_manifest(&with_components(concat!(
        "  - name: web\n",
        "    docker:\n",
        "      file: Dockerfile\n",
        "      build-args:\n",
        "        - name: NODE_VERSION\n",
        "          value: 22\n",
        "        - {name: FLAVOUR, value: slim}\n",
    )))
    .unwrap();
    let ComponentSource::Docker(DockerSource {
        build: DockerBuild::Dockerfile { args, .. },
        ..
    }) = &m.components[0].source
    else {
        panic!("a Dockerfile build")
    };
    assert_eq!(args.get("NODE_VERSION").map(String::as_str), Some("22"));
    assert_eq!(args.get("FLAVOUR").map(String::as_str), Some("slim"));
}

#[test]
fn build_args_need_name_and_value_each_once() {
    let all = errors(&with_components(concat!(
        "  - name: web\n",                           // 3
        "    docker:\n",                             // 4
        "      file: Dockerfile\n",                  // 5
        "      build-args:\n",                       // 6
        "        - {name: A, value: 1}\n",           // 7
        "        - {name: A, value: 2}\n",           // 8
        "        - {name: B}\n",                     // 9
        "        - {name: C, value: 1, vlaue: 2}\n", // 10
    )));
    let got: Vec<(&str, usize)> = all.iter().map(|e| (e.0.as_str(), e.1)).collect();
    assert_eq!(
        got,
        [
            ("components[0].docker.build-args[1].name", 8),
            ("components[0].docker.build-args[2]", 9),
            ("components[0].docker.build-args[3].vlaue", 10),
        ]
    );
    assert!(all[0].3.contains("already set by"), "{}", all[0].3);
    assert!(
        all[1].3.contains("missing required field value"),
        "{}",
        all[1].3
    );
    assert!(all[2].3.contains("did you mean value?"), "{}", all[2].3);
}

#[test]
fn platform_is_a_list_of_architectures() {
    let m = parse_manifest(&with_components(concat!(
        "  - name: web\n",
        "    docker:\n",
        "      image: x\n",
        "      platform: [{arch: arm64}, {arch: amd64}]\n",
        "  - name: old\n",
        "    docker: {image: x, platform: linux/arm64}\n",
    )))
    .unwrap();
    let platforms = |i: usize| match &m.components[i].source {
        ComponentSource::Docker(d) => d.platforms.clone(),
        ComponentSource::Process(_) => panic!("docker"),
    };
    assert_eq!(platforms(0), [Arch::Arm64, Arch::Amd64]);
    assert_eq!(platforms(1), [Arch::Arm64], "the earlier single form");
}

#[test]
fn platform_errors_name_the_architectures_there_are() {
    let all = errors(&with_components(concat!(
        "  - name: web\n",  // 3
        "    docker:\n",    // 4
        "      image: x\n", // 5
        "      platform: [{arch: x86_64}, {arch: arm64}, {arch: arm64}, {os: linux}]\n", // 6
        "  - name: b\n",    // 7
        "    docker: {image: x, platform: linux/arm/v7}\n", // 8
    )));
    let got: Vec<&str> = all.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        got,
        [
            "components[0].docker.platform[0].arch",
            "components[0].docker.platform[2].arch",
            "components[0].docker.platform[3]",
            "components[0].docker.platform[3].os",
            "components[1].docker.platform",
        ]
    );
    assert!(all[0].3.contains("amd64 or arm64") && all[0].3.contains("x86_64 is called amd64"));
    assert!(all[1].3.contains("already listed"), "{}", all[1].3);
    assert!(
        all[4].3.contains("[{arch: amd64}, {arch: arm64}]"),
        "{}",
        all[4].3
    );
}

#[test]
fn identity_is_accepted_and_kept() {
    let m = parse_manifest(&with_components(
        "  - name: job\n    docker: {image: x}\n    identity: reports-writer\n",
    ))
    .unwrap();
    assert_eq!(m.components[0].identity.as_deref(), Some("reports-writer"));
    let (path, _, _, message) = single(&with_components(
        "  - name: job\n    docker: {image: x}\n    identity: [a]\n",
    ));
    assert_eq!(path, "components[0].identity");
    assert!(message.contains("found a list"), "{message}");
}

#[test]
fn file_content_next_to_a_config_ref_is_its_default() {
    let m = parse_manifest(&with_components(concat!(
        "  - name: web\n",
        "    docker: {image: x}\n",
        "    files:\n",
        "      - {path: /etc/app.json, config-ref: app.json, content: '{}'}\n",
        "      - {path: /etc/other, config-ref: other}\n",
    )))
    .unwrap();
    let files = &m.components[0].files;
    assert_eq!(
        files[0].source,
        FileSource::ConfigRef {
            key: "app.json".into(),
            default: Some("{}".into())
        }
    );
    assert_eq!(
        files[1].source,
        FileSource::ConfigRef {
            key: "other".into(),
            default: None
        }
    );
}

#[test]
fn storage_needs_a_size() {
    let (path, line, column, message) = single(&with_components(
        "  - name: db\n    docker: {image: x}\n    storage:\n      - name: data\n        path: /data\n",
    ));
    assert_eq!(
        (path.as_str(), line, column),
        ("components[0].storage[0]", 6, 9)
    );
    assert!(message.contains("missing required field size"), "{message}");
}

#[test]
fn an_ingress_of_a_component_with_several_ports_names_its_port() {
    let (path, line, _, message) = single(&with_components(concat!(
        "  - name: api\n",
        "    docker: {image: x}\n",
        "    ports: [8080, 9090]\n",
        "    ingresses:\n",
        "      - host: api\n",
        "        port: 8080\n",
        "      - host: metrics\n",
    )));
    assert_eq!((path.as_str(), line), ("components[0].ingresses[1]", 9));
    assert!(message.contains("several ports (8080, 9090)"), "{message}");
    // One port: host alone is enough.
    let m = parse_manifest(&with_components(
        "  - name: web\n    docker: {image: x}\n    ports: [80]\n    ingresses: [{host: www}, {host: shop, path: \"/\"}]\n",
    ))
    .unwrap();
    assert_eq!(m.components[0].ingresses.len(), 2);
    assert_eq!(m.components[0].ingresses[1].path.as_deref(), Some("/"));
}

#[test]
fn recorded_builds_keep_what_earlier_versions_accepted() {
    let text = with_components(concat!(
        "  - name: db\n",
        "    docker: {image: x}\n",
        "    ports: [5432, 9187]\n",
        "    ingresses: [{host: db}]\n",
        "    storage: [{name: data, path: /data}]\n",
    ));
    let all = errors(&text);
    assert_eq!(all.len(), 2, "{all:#?}");
    let m = parse_recorded_manifest(&text).unwrap();
    assert_eq!(m.components[0].storage[0].size, None);
    assert_eq!(m.components[0].ingresses[0].port, None, "the first port");
    // Everything else is as strict.
    let broken =
        with_components("  - name: db\n    docker: {image: x}\n    storage: [{name: data}]\n");
    assert!(parse_recorded_manifest(&broken).is_err());
}
