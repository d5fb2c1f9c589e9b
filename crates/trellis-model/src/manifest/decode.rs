//! Walks a loaded YAML tree along the v1 schema, building the typed manifest
//! and collecting every error with its field path and position.
//!
//! The walker never stops at the first problem: each field is decoded to a
//! best-effort value (a default where it is broken) so the rest of the
//! document is still checked, and the result is discarded when any error was
//! recorded.

use std::collections::BTreeMap;

use super::checks;
use super::yaml::{Node, Pos, Value};
use super::{
    Arch, ByteQuantity, Component, ComponentSource, CpuQuantity, DeviceRequest, DockerBuild,
    DockerSource, EnvSource, EnvVar, FileMount, FileSource, Ingress, MANIFEST_VERSION, Manifest,
    ManifestError, ProcessSource, Resources, Scaling, Schedule, Storage, StorageKind,
};
use crate::name::{NameKind, validate_name};

const TOP_FIELDS: &[&str] = &["version", "components"];
const COMPONENT_FIELDS: &[&str] = &[
    "name",
    "docker",
    "process",
    "ports",
    "ingresses",
    "env",
    "files",
    "resources",
    "scaling",
    "storage",
    "scheduled",
    "scheduled-timezone",
    "max-retries",
    "command",
    "args",
    "user",
    "identity",
    "devices",
];
const DOCKER_FIELDS: &[&str] = &["image", "file", "build-context", "build-args", "platform"];
const PROCESS_FIELDS: &[&str] = &["path", "command"];
const INGRESS_FIELDS: &[&str] = &["host", "port", "path", "sticky"];
const BUILD_ARG_FIELDS: &[&str] = &["name", "value"];
const PLATFORM_FIELDS: &[&str] = &["arch"];
const ENV_FIELDS: &[&str] = &["name", "value", "config-ref", "component-ref"];
const FILE_FIELDS: &[&str] = &["path", "content", "config-ref"];
const RESOURCES_FIELDS: &[&str] = &["cpu", "memory"];
const SCALING_FIELDS: &[&str] = &["min", "max"];
const STORAGE_FIELDS: &[&str] = &["name", "path", "size", "type"];
const DEVICE_FIELDS: &[&str] = &["name"];

/// How strictly a manifest is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Strictness {
    /// A manifest being validated or pushed: the platform's rules.
    #[default]
    New,
    /// The manifest of a build already recorded: also what earlier Trellis
    /// versions accepted (storage without `size`, an ingress without `port`
    /// on a component with several), so an upgraded hub or agent can still
    /// run every build it holds.
    Recorded,
}

pub(crate) fn decode(root: &Node, strictness: Strictness) -> Result<Manifest, Vec<ManifestError>> {
    let mut decoder = Decoder {
        strictness,
        ..Decoder::default()
    };
    let manifest = decoder.manifest(root);
    if decoder.errors.is_empty() {
        Ok(manifest)
    } else {
        Err(decoder.errors)
    }
}

/// A `component-ref`, checked once all component names are known.
struct PendingRef {
    target: String,
    path: String,
    pos: Pos,
}

#[derive(Default)]
struct Decoder {
    errors: Vec<ManifestError>,
    refs: Vec<PendingRef>,
    /// Every ingress's host and path, to refuse two that route the same
    /// requests.
    routes: Vec<IngressRoute>,
    strictness: Strictness,
}

/// Where one ingress routes from, as written.
struct IngressRoute {
    /// The host prefix, lowercased (hosts are case-insensitive).
    host: String,
    path: String,
    at: String,
    pos: Pos,
}

/// The fields of a mapping that passed the unknown/duplicate key checks.
struct Fields<'n> {
    path: String,
    pos: Pos,
    entries: Vec<(&'n str, &'n Node, &'n Node)>,
}

impl<'n> Fields<'n> {
    /// The value of `name` if it is present, even if it is null.
    fn raw(&self, name: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(key, _, _)| *key == name)
            .map(|(_, _, value)| *value)
    }

    /// The value of `name` if it is present and not null: optional fields
    /// written without a value count as absent.
    fn get(&self, name: &str) -> Option<&'n Node> {
        self.raw(name).filter(|n| !n.is_null())
    }

    fn has(&self, name: &str) -> bool {
        self.raw(name).is_some()
    }

    fn key_pos(&self, name: &str) -> Pos {
        self.entries
            .iter()
            .find(|(key, _, _)| *key == name)
            .map_or(self.pos, |(_, key, _)| key.pos)
    }

    fn path(&self, name: &str) -> String {
        join(&self.path, name)
    }
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_owned()
    } else {
        format!("{path}.{field}")
    }
}

fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

/// Names a node's kind and content for "expected X, found Y" messages.
fn describe(node: &Node) -> String {
    match &node.value {
        Value::Seq(_) => "a list".into(),
        Value::Map(_) => "a mapping".into(),
        Value::Scalar(s) if s.is_null() => "no value".into(),
        Value::Scalar(s) if s.plain && parse_int(&s.text).is_some() => {
            format!("the number {}", s.text)
        }
        Value::Scalar(s) if s.plain && parse_bool(&s.text).is_some() => {
            format!("the boolean {}", s.text)
        }
        Value::Scalar(s) => {
            let mut text: String = s.text.chars().take(40).collect();
            if text.len() < s.text.len() {
                text.push('…');
            }
            format!("the text {text:?}")
        }
    }
}

/// A YAML 1.2 core-schema integer: decimal, `0o` octal or `0x` hex.
fn parse_int(text: &str) -> Option<i128> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let (radix, digits) = if let Some(hex) = digits.strip_prefix("0x") {
        (16, hex)
    } else if let Some(oct) = digits.strip_prefix("0o") {
        (8, oct)
    } else {
        (10, digits)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    // Digits-only text too long for i128 is still a number, just a huge one.
    let value = i128::from_str_radix(digits, radix).unwrap_or(i128::MAX);
    Some(if negative { -value } else { value })
}

/// A YAML 1.2 core-schema boolean.
fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "true" | "True" | "TRUE" => Some(true),
        "false" | "False" | "FALSE" => Some(false),
        _ => None,
    }
}

fn list_names(names: &[&str]) -> String {
    names.join(", ")
}

impl Decoder {
    fn error(&mut self, path: &str, pos: Pos, message: impl Into<String>) {
        self.errors.push(ManifestError {
            path: path.to_owned(),
            line: pos.line,
            column: pos.column,
            message: message.into(),
        });
    }

    // === generic shapes ===

    /// Checks that `node` is a mapping whose keys are all in `allowed`, each
    /// once. Unknown and duplicate keys are reported and left out.
    fn fields<'n>(&mut self, node: &'n Node, path: &str, allowed: &[&str]) -> Option<Fields<'n>> {
        let Value::Map(entries) = &node.value else {
            self.error(
                path,
                node.pos,
                format!(
                    "expected a mapping with the fields {}, found {}",
                    list_names(allowed),
                    describe(node)
                ),
            );
            return None;
        };
        let mut fields = Fields {
            path: path.to_owned(),
            pos: node.pos,
            entries: Vec::with_capacity(entries.len()),
        };
        for entry in entries {
            let Some(key) = self.key(&entry.key, path) else {
                continue;
            };
            if let Some((_, first, _)) = fields.entries.iter().find(|(k, _, _)| *k == key) {
                let first = first.pos;
                self.error(
                    &join(path, key),
                    entry.key.pos,
                    format!(
                        "{key} is set twice; the first is at line {}, column {}; keep one",
                        first.line, first.column
                    ),
                );
                continue;
            }
            if !allowed.contains(&key) {
                let hint = checks::closest(&key.replace('_', "-"), allowed)
                    .map(|c| format!("did you mean {c}? "))
                    .unwrap_or_default();
                self.error(
                    &join(path, key),
                    entry.key.pos,
                    format!(
                        "unknown field {key:?}; {hint}the fields here are: {}",
                        list_names(allowed)
                    ),
                );
                continue;
            }
            fields.entries.push((key, &entry.key, &entry.value));
        }
        Some(fields)
    }

    /// Keys of a user-defined mapping (such as `build-args`), each once.
    fn entries<'n>(&mut self, node: &'n Node, path: &str) -> Vec<(&'n str, &'n Node)> {
        let Value::Map(entries) = &node.value else {
            self.error(
                path,
                node.pos,
                format!(
                    "expected a mapping of names to values, found {}",
                    describe(node)
                ),
            );
            return Vec::new();
        };
        let mut out: Vec<(&str, &Node, &Node)> = Vec::with_capacity(entries.len());
        for entry in entries {
            let Some(key) = self.key(&entry.key, path) else {
                continue;
            };
            if let Some((_, first, _)) = out.iter().find(|(k, _, _)| *k == key) {
                let first = first.pos;
                self.error(
                    &join(path, key),
                    entry.key.pos,
                    format!(
                        "{key} is set twice; the first is at line {}, column {}; keep one",
                        first.line, first.column
                    ),
                );
                continue;
            }
            out.push((key, &entry.key, &entry.value));
        }
        out.into_iter().map(|(k, _, v)| (k, v)).collect()
    }

    fn key<'n>(&mut self, key: &'n Node, path: &str) -> Option<&'n str> {
        match &key.value {
            Value::Scalar(s) if !s.is_null() => Some(&s.text),
            _ => {
                self.error(
                    path,
                    key.pos,
                    format!("a key must be a name, found {}", describe(key)),
                );
                None
            }
        }
    }

    /// Looks up a required field; a missing one is reported at the mapping
    /// that lacks it, an empty one at its key.
    fn required<'n>(
        &mut self,
        fields: &Fields<'n>,
        name: &str,
        expected: &str,
    ) -> Option<&'n Node> {
        match fields.raw(name) {
            None => {
                self.error(
                    &fields.path,
                    fields.pos,
                    format!("missing required field {name}; expected {expected}"),
                );
                None
            }
            Some(node) if node.is_null() => {
                self.error(
                    &fields.path(name),
                    fields.key_pos(name),
                    format!("{name} has no value; expected {expected}"),
                );
                None
            }
            Some(node) => Some(node),
        }
    }

    fn list<'n>(&mut self, node: &'n Node, path: &str, of: &str) -> &'n [Node] {
        match &node.value {
            Value::Seq(items) => items,
            _ => {
                self.error(
                    path,
                    node.pos,
                    format!(
                        "expected a list of {of}, found {}; write one item per line starting with '- '",
                        describe(node)
                    ),
                );
                &[]
            }
        }
    }

    /// Any scalar as text: numbers and booleans are kept as written, which
    /// is what `value: 8080` or `user: 1000` mean.
    fn text(&mut self, node: &Node, path: &str, expected: &str) -> Option<String> {
        match &node.value {
            Value::Scalar(s) if !s.is_null() => Some(s.text.clone()),
            _ => {
                self.error(
                    path,
                    node.pos,
                    format!("expected {expected}, found {}", describe(node)),
                );
                None
            }
        }
    }

    /// Like [`Self::text`], but a value left empty (`value:`, `~`, `null`)
    /// is the empty text, as Kubernetes reads an env value without one.
    fn text_or_empty(&mut self, node: &Node, path: &str, expected: &str) -> Option<String> {
        if node.is_null() {
            return Some(String::new());
        }
        self.text(node, path, expected)
    }

    /// Like [`Self::text`] but blank text is an error too.
    fn non_blank(&mut self, node: &Node, path: &str, expected: &str) -> Option<String> {
        let text = self.text(node, path, expected)?;
        if text.trim().is_empty() {
            self.error(path, node.pos, format!("is empty; expected {expected}"));
            return None;
        }
        Some(text)
    }

    fn integer(&mut self, node: &Node, path: &str, expected: &str) -> Option<i128> {
        if let Value::Scalar(s) = &node.value {
            if s.plain
                && let Some(value) = parse_int(&s.text)
            {
                return Some(value);
            }
            if !s.plain && parse_int(&s.text).is_some() {
                self.error(
                    path,
                    node.pos,
                    format!(
                        "expected {expected}, found the text {:?}; write the number without quotes",
                        s.text
                    ),
                );
                return None;
            }
        }
        self.error(
            path,
            node.pos,
            format!("expected {expected}, found {}", describe(node)),
        );
        None
    }

    fn count(&mut self, node: &Node, path: &str, what: &str) -> Option<u32> {
        let expected = format!("{what} (a whole number, 0 or more)");
        let value = self.integer(node, path, &expected)?;
        match u32::try_from(value) {
            Ok(value) => Some(value),
            Err(_) if value < 0 => {
                self.error(
                    path,
                    node.pos,
                    format!("{value} is negative; expected {expected}"),
                );
                None
            }
            Err(_) => {
                self.error(
                    path,
                    node.pos,
                    format!("{value} is too large; expected {expected}"),
                );
                None
            }
        }
    }

    fn port(&mut self, node: &Node, path: &str) -> Option<u16> {
        let value = self.integer(node, path, "a port number (1-65535)")?;
        match u16::try_from(value) {
            Ok(port) if port != 0 => Some(port),
            _ => {
                self.error(
                    path,
                    node.pos,
                    format!("{value} is not a port; use 1-65535"),
                );
                None
            }
        }
    }

    fn boolean(&mut self, node: &Node, path: &str) -> Option<bool> {
        if let Some(value) = node.plain_text().and_then(parse_bool) {
            return Some(value);
        }
        self.error(
            path,
            node.pos,
            format!("expected true or false, found {}", describe(node)),
        );
        None
    }

    fn strings(&mut self, node: &Node, path: &str) -> Vec<String> {
        let items = self.list(node, path, "strings");
        items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| self.text(item, &index(path, i), "a string"))
            .collect()
    }

    /// Reports `Err` messages of a value rule at the value.
    fn check(&mut self, result: Result<(), String>, path: &str, node: &Node) {
        if let Err(message) = result {
            self.error(path, node.pos, message);
        }
    }

    // === the schema ===

    fn manifest(&mut self, root: &Node) -> Manifest {
        let mut manifest = Manifest {
            version: MANIFEST_VERSION.to_owned(),
            components: Vec::new(),
        };
        let Some(top) = self.fields(root, "", TOP_FIELDS) else {
            return manifest;
        };
        if let Some(node) = self.required(&top, "version", "version: v1")
            && let Some(version) = self.text(node, "version", "v1")
            && version != MANIFEST_VERSION
        {
            self.error(
                "version",
                node.pos,
                format!("version {version:?} is not supported; use version: v1"),
            );
        }
        if let Some(node) = self.required(&top, "components", "a list of components") {
            let items = self.list(node, "components", "components");
            if items.is_empty() && matches!(node.value, Value::Seq(_)) {
                self.error(
                    "components",
                    node.pos,
                    "the list is empty; a manifest needs at least one component",
                );
            }
            manifest.components = items
                .iter()
                .enumerate()
                .map(|(i, item)| self.component(i, item))
                .collect();
            self.check_names(items, &manifest.components);
            self.check_refs(&manifest.components);
            self.check_routes();
        }
        manifest
    }

    fn check_names(&mut self, items: &[Node], components: &[Component]) {
        // `components` was built from `items` one for one, so they zip.
        let named: Vec<(&Node, &Component)> = items.iter().zip(components).collect();
        for (i, (item, component)) in named.iter().enumerate() {
            if component.name.is_empty() {
                continue;
            }
            let Some((first, (first_item, _))) = named[..i]
                .iter()
                .enumerate()
                .find(|(_, (_, c))| c.name == component.name)
            else {
                continue;
            };
            self.error(
                &format!("components[{i}].name"),
                name_pos(item),
                format!(
                    "component name {:?} is already used by components[{first}] (line {}); component names must be unique",
                    component.name,
                    name_pos(first_item).line
                ),
            );
        }
    }

    fn check_refs(&mut self, components: &[Component]) {
        let names: Vec<&str> = components
            .iter()
            .map(|c| c.name.as_str())
            .filter(|n| !n.is_empty())
            .collect();
        // A component may name itself: that gives its own host name.
        for r in std::mem::take(&mut self.refs) {
            if !names.contains(&r.target.as_str()) {
                self.error(
                    &r.path,
                    r.pos,
                    format!(
                        "component-ref {:?} names no component in this manifest; components are: {}",
                        r.target,
                        list_names(&names)
                    ),
                );
            }
        }
    }

    /// One host and path go to one place: a second ingress with both the
    /// same would make which component answers a matter of chance.
    fn check_routes(&mut self) {
        let routes = std::mem::take(&mut self.routes);
        for (i, route) in routes.iter().enumerate() {
            if let Some(first) = routes[..i]
                .iter()
                .find(|r| r.host == route.host && r.path == route.path)
            {
                self.error(
                    &route.at,
                    route.pos,
                    format!(
                        "host {:?} with path {:?} is already routed by {} (line {}); \
                         give this ingress another host or path, or remove one of them",
                        route.host, route.path, first.at, first.pos.line
                    ),
                );
            }
        }
    }

    fn component(&mut self, i: usize, node: &Node) -> Component {
        let path = index("components", i);
        let mut component = Component {
            name: String::new(),
            source: ComponentSource::Process(ProcessSource {
                path: String::new(),
                command: Vec::new(),
            }),
            ports: Vec::new(),
            ingresses: Vec::new(),
            env: Vec::new(),
            files: Vec::new(),
            resources: Resources::default(),
            scaling: None,
            storage: Vec::new(),
            scheduled: None,
            scheduled_timezone: None,
            max_retries: None,
            command: None,
            args: None,
            user: None,
            identity: None,
            devices: Vec::new(),
        };
        let Some(f) = self.fields(node, &path, COMPONENT_FIELDS) else {
            return component;
        };

        if let Some(n) = self.required(&f, "name", "a DNS label like web or sensor-bridge") {
            let name_path = f.path("name");
            if let Some(name) = self.text(n, &name_path, "a component name") {
                match validate_name(NameKind::Component, &name) {
                    Ok(()) => component.name = name,
                    Err(err) => self.error(&name_path, n.pos, err.to_string()),
                }
            }
        }

        match (f.raw("docker"), f.raw("process")) {
            (Some(docker), process) => {
                if process.is_some() {
                    self.error(
                        &path,
                        f.pos,
                        "has both docker and process; use exactly one: docker to run a container image, process to run a program directly on the host",
                    );
                    if let Some(p) = process {
                        self.process(p, &f.path("process"));
                    }
                }
                component.source = self.docker(docker, &f.path("docker"));
            }
            (None, Some(process)) => {
                component.source = self.process(process, &f.path("process"));
            }
            (None, None) => self.error(
                &path,
                f.pos,
                "has neither docker nor process; add one: docker to run a container image, process to run a program directly on the host",
            ),
        }

        if let Some(n) = f.get("ports") {
            component.ports = self.ports(n, &f.path("ports"));
        }
        if let Some(n) = f.get("ingresses") {
            component.ingresses = self.ingresses(n, &f.path("ingresses"), &component.ports);
        }
        if let Some(n) = f.get("env") {
            component.env = self.env(n, &f.path("env"));
        }
        if let Some(n) = f.get("files") {
            component.files = self.files(n, &f.path("files"));
        }
        if let Some(n) = f.get("resources") {
            component.resources = self.resources(n, &f.path("resources"));
        }
        if let Some(n) = f.get("scaling") {
            component.scaling = self.scaling(n, &f.path("scaling"));
        }
        if let Some(n) = f.get("storage") {
            component.storage = self.storage(n, &f.path("storage"));
        }
        if let Some(n) = f.get("scheduled") {
            let p = f.path("scheduled");
            if let Some(text) = self.text(n, &p, "a cron schedule or @release") {
                match text.parse::<Schedule>() {
                    Ok(schedule) => component.scheduled = Some(schedule),
                    Err(message) => self.error(&p, n.pos, message),
                }
            }
        }
        if let Some(n) = f.get("scheduled-timezone") {
            let p = f.path("scheduled-timezone");
            if let Some(tz) = self.text(n, &p, "an IANA time zone name like Europe/Zurich") {
                self.check(checks::check_timezone(&tz), &p, n);
                component.scheduled_timezone = Some(tz);
            }
        }
        if let Some(n) = f.get("max-retries") {
            component.max_retries = self.count(n, &f.path("max-retries"), "the number of retries");
        }
        if let Some(n) = f.get("command") {
            component.command = Some(self.strings(n, &f.path("command")));
        }
        if let Some(n) = f.get("args") {
            component.args = Some(self.strings(n, &f.path("args")));
        }
        if let Some(n) = f.get("user") {
            component.user = self.non_blank(n, &f.path("user"), "a uid, uid:gid or user name");
        }
        if let Some(n) = f.get("identity") {
            component.identity = self.non_blank(
                n,
                &f.path("identity"),
                "the name of a cloud identity of the stage",
            );
        }

        if let Some(n) = f.get("devices") {
            component.devices = self.devices(n, &f.path("devices"));
        }

        if f.get("scheduled").is_some() {
            if f.get("scaling").is_some() {
                self.error(
                    &f.path("scaling"),
                    f.key_pos("scaling"),
                    "a scheduled component cannot have scaling: it runs once per schedule; remove scaling or scheduled",
                );
            }
            if f.get("ingresses").is_some() {
                self.error(
                    &f.path("ingresses"),
                    f.key_pos("ingresses"),
                    "a scheduled component cannot have ingresses: nothing is running between its runs to serve them; remove ingresses or scheduled",
                );
            }
        }
        component
    }

    fn docker(&mut self, node: &Node, path: &str) -> ComponentSource {
        let mut source = DockerSource {
            build: DockerBuild::Image(String::new()),
            platforms: Vec::new(),
        };
        let Some(f) = self.fields(node, path, DOCKER_FIELDS) else {
            return ComponentSource::Docker(source);
        };
        match (f.raw("image"), f.raw("file")) {
            (Some(image), None) => {
                if let Some(image) =
                    self.non_blank(image, &f.path("image"), "an image like nginx:1.27")
                {
                    source.build = DockerBuild::Image(image);
                }
                for field in ["build-context", "build-args"] {
                    if f.get(field).is_some() {
                        self.error(
                            &f.path(field),
                            f.key_pos(field),
                            format!(
                                "{field} only applies when building from a Dockerfile (file), \
                                 not to a ready image"
                            ),
                        );
                    }
                }
            }
            (None, Some(file)) => {
                let file = self.non_blank(
                    file,
                    &f.path("file"),
                    "the path of a Dockerfile in the project",
                );
                let context = f.get("build-context").and_then(|n| {
                    self.non_blank(n, &f.path("build-context"), "a directory of the project")
                });
                let args = match f.get("build-args") {
                    Some(n) => self.build_args(n, &f.path("build-args")),
                    None => BTreeMap::new(),
                };
                source.build = DockerBuild::Dockerfile {
                    file: file.unwrap_or_default(),
                    context,
                    args,
                };
            }
            (Some(_), Some(_)) => self.error(
                path,
                f.pos,
                "has both image and file; use image to run a ready image, \
                 or file to build one from a Dockerfile",
            ),
            (None, None) => self.error(
                path,
                f.pos,
                "needs image (a ready image like nginx:1.27) or file (a Dockerfile to build)",
            ),
        }
        if let Some(n) = f.get("platform") {
            source.platforms = self.platforms(n, &f.path("platform"));
        }
        ComponentSource::Docker(source)
    }

    /// `build-args`: the platform's list of `{name, value}`; a mapping of
    /// names to values is read too, as manifests of earlier Trellis
    /// versions wrote it (builds keep their manifest, and agents read it
    /// again).
    fn build_args(&mut self, node: &Node, path: &str) -> BTreeMap<String, String> {
        let mut args = BTreeMap::new();
        if let Value::Map(_) = node.value {
            for (key, value) in self.entries(node, path) {
                let p = join(path, key);
                if let Some(value) = self.text_or_empty(value, &p, "a string") {
                    args.insert(key.to_owned(), value);
                }
            }
            return args;
        }
        let items = self.list(node, path, "build arguments (name plus value)");
        let mut seen: Vec<(String, usize, Pos)> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let ap = index(path, i);
            let Some(f) = self.fields(item, &ap, BUILD_ARG_FIELDS) else {
                continue;
            };
            let name = self
                .required(&f, "name", "the build argument's name, as the Dockerfile's ARG")
                .and_then(|n| {
                    let p = f.path("name");
                    let name = self.non_blank(n, &p, "a build argument name")?;
                    if let Some((_, first, pos)) = seen.iter().find(|(s, _, _)| *s == name) {
                        let message = format!(
                            "{name} is already set by {path}[{first}] (line {}); set each build argument once",
                            pos.line
                        );
                        self.error(&p, n.pos, message);
                        return None;
                    }
                    seen.push((name.clone(), i, n.pos));
                    Some(name)
                });
            let value = self
                .required(&f, "value", "the build argument's value")
                .and_then(|n| self.text(n, &f.path("value"), "a string, number or true/false"));
            if let (Some(name), Some(value)) = (name, value) {
                args.insert(name, value);
            }
        }
        args
    }

    /// `platform`: the platform's list of `{arch: amd64|arm64}`. A single
    /// `linux/amd64` or `linux/arm64`, as manifests of earlier Trellis
    /// versions wrote it, is read as a list of one.
    fn platforms(&mut self, node: &Node, path: &str) -> Vec<Arch> {
        if let Value::Scalar(_) = node.value {
            let Some(text) = self.text(node, path, "a list of architectures") else {
                return Vec::new();
            };
            let arch = text.strip_prefix("linux/").unwrap_or(&text);
            return match arch.parse::<Arch>() {
                Ok(arch) => vec![arch],
                Err(_) => {
                    self.error(
                        path,
                        node.pos,
                        format!(
                            "{text:?} is not a platform list; write platform: [{{arch: amd64}}, {{arch: arm64}}] (amd64 and arm64 are the architectures there are)"
                        ),
                    );
                    Vec::new()
                }
            };
        }
        let items = self.list(node, path, "architectures, like {arch: arm64}");
        let mut out: Vec<(Arch, usize)> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let pp = index(path, i);
            let Some(f) = self.fields(item, &pp, PLATFORM_FIELDS) else {
                continue;
            };
            let Some(n) = self.required(&f, "arch", "amd64 or arm64") else {
                continue;
            };
            let p = f.path("arch");
            let Some(text) = self.text(n, &p, "amd64 or arm64") else {
                continue;
            };
            match text.parse::<Arch>() {
                Err(message) => {
                    let hint = match text.as_str() {
                        "x86_64" | "x86-64" | "x64" => "; x86_64 is called amd64 here",
                        "aarch64" | "arm64v8" => "; aarch64 is called arm64 here",
                        _ => "",
                    };
                    self.error(&p, n.pos, format!("{message}{hint}"));
                }
                Ok(arch) => match out.iter().find(|(a, _)| *a == arch) {
                    Some((_, first)) => self.error(
                        &p,
                        n.pos,
                        format!("{arch} is already listed as {path}[{first}]; list each architecture once"),
                    ),
                    None => out.push((arch, i)),
                },
            }
        }
        out.into_iter().map(|(a, _)| a).collect()
    }

    fn process(&mut self, node: &Node, path: &str) -> ComponentSource {
        let mut source = ProcessSource {
            path: String::new(),
            command: Vec::new(),
        };
        let Some(f) = self.fields(node, path, PROCESS_FIELDS) else {
            return ComponentSource::Process(source);
        };
        if let Some(n) = self.required(&f, "path", "a directory of the project, like ./bin") {
            let p = f.path("path");
            if let Some(dir) = self.text(n, &p, "a directory of the project") {
                self.check(checks::check_project_path(&dir), &p, n);
                source.path = dir;
            }
        }
        if let Some(n) = self.required(&f, "command", "a list: the program and its arguments") {
            let p = f.path("command");
            source.command = self.strings(n, &p);
            let first_blank = source.command.first().is_none_or(|c| c.trim().is_empty());
            if matches!(n.value, Value::Seq(_)) && first_blank {
                self.error(
                    &p,
                    n.pos,
                    "names no program; give the program and its arguments, like [\"./server\", \"--port\", \"8080\"]",
                );
            }
        }
        ComponentSource::Process(source)
    }

    fn ports(&mut self, node: &Node, path: &str) -> Vec<u16> {
        let items = self.list(node, path, "port numbers");
        let mut ports: Vec<(u16, usize)> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let p = index(path, i);
            let Some(port) = self.port(item, &p) else {
                continue;
            };
            if let Some((_, first)) = ports.iter().find(|(q, _)| *q == port) {
                let first = *first;
                self.error(
                    &p,
                    item.pos,
                    format!(
                        "port {port} is already listed as {path}[{first}]; list each port once"
                    ),
                );
                continue;
            }
            ports.push((port, i));
        }
        ports.into_iter().map(|(p, _)| p).collect()
    }

    fn ingresses(&mut self, node: &Node, path: &str, ports: &[u16]) -> Vec<Ingress> {
        let items = self.list(node, path, "ingresses");
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let ip = index(path, i);
            let Some(f) = self.fields(item, &ip, INGRESS_FIELDS) else {
                continue;
            };
            let mut ingress = Ingress {
                host: String::new(),
                port: None,
                path: None,
                sticky: false,
            };
            if let Some(n) = self.required(&f, "host", "a host prefix like shop") {
                let p = f.path("host");
                if let Some(host) = self.text(n, &p, "a host prefix like shop") {
                    // Builds recorded before hosts became prefixes carry
                    // whole host names; they stay runnable (the outpost
                    // adds its names after them just the same).
                    let checked = match self.strictness {
                        Strictness::New => checks::check_host_prefix(&host),
                        Strictness::Recorded => checks::check_hostname(&host),
                    };
                    self.check(checked, &p, n);
                    ingress.host = host;
                }
            }
            match f.get("port") {
                Some(n) => {
                    let p = f.path("port");
                    if let Some(port) = self.port(n, &p) {
                        if !ports.contains(&port) {
                            let listed = if ports.is_empty() {
                                "the component lists no ports".to_owned()
                            } else {
                                let list: Vec<String> = ports.iter().map(u16::to_string).collect();
                                format!("the component's ports are {}", list.join(", "))
                            };
                            self.error(
                                &p,
                                n.pos,
                                format!(
                                    "port {port} is not one of the component's ports ({listed}); \
                                     add it to ports or route to one of them"
                                ),
                            );
                        }
                        ingress.port = Some(port);
                    }
                }
                None if ports.is_empty() => self.error(
                    &ip,
                    f.pos,
                    "has no port to route to: the component lists no ports; add the port the component listens on to ports",
                ),
                None if ports.len() > 1 && self.strictness == Strictness::New => {
                    let list: Vec<String> = ports.iter().map(u16::to_string).collect();
                    self.error(
                        &ip,
                        f.pos,
                        format!(
                            "needs a port: the component has several ports ({}); add port: with the one this ingress routes to",
                            list.join(", ")
                        ),
                    );
                }
                None => {}
            }
            if let Some(n) = f.get("path") {
                let p = f.path("path");
                if let Some(url_path) = self.text(n, &p, "a URL path like /api") {
                    self.check(checks::check_url_path(&url_path), &p, n);
                    ingress.path = Some(url_path);
                }
            }
            if let Some(n) = f.get("sticky") {
                ingress.sticky = self.boolean(n, &f.path("sticky")).unwrap_or(false);
            }
            self.routes.push(IngressRoute {
                host: ingress.host.to_ascii_lowercase(),
                // `/api` and `/api/` route the same requests.
                path: match ingress.path.as_deref().map(|p| p.trim_end_matches('/')) {
                    None | Some("") => "/".to_owned(),
                    Some(p) => p.to_owned(),
                },
                at: ip,
                pos: f.pos,
            });
            out.push(ingress);
        }
        out
    }

    fn env(&mut self, node: &Node, path: &str) -> Vec<EnvVar> {
        let items = self.list(
            node,
            path,
            "variables (name plus value, config-ref or component-ref)",
        );
        let mut out: Vec<EnvVar> = Vec::with_capacity(items.len());
        let mut seen: Vec<(String, usize, Pos)> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let ep = index(path, i);
            let Some(f) = self.fields(item, &ep, ENV_FIELDS) else {
                continue;
            };
            let mut name = String::new();
            if let Some(n) = self.required(&f, "name", "a variable name like DATABASE_URL") {
                let p = f.path("name");
                if let Some(text) = self.text(n, &p, "a variable name") {
                    match checks::check_env_name(&text) {
                        Err(message) => self.error(&p, n.pos, message),
                        Ok(()) => {
                            if let Some((_, first, pos)) = seen.iter().find(|(s, _, _)| *s == text)
                            {
                                let message = format!(
                                    "{text} is already set by {path}[{first}] (line {}); set each variable once",
                                    pos.line
                                );
                                self.error(&p, n.pos, message);
                            } else {
                                seen.push((text.clone(), i, n.pos));
                            }
                            name = text;
                        }
                    }
                }
            }

            let (has_value, has_config, has_component) =
                (f.has("value"), f.has("config-ref"), f.has("component-ref"));
            let value = f.raw("value").and_then(|n| {
                self.text_or_empty(n, &f.path("value"), "a string, number or true/false")
            });
            let config = f
                .raw("config-ref")
                .and_then(|n| self.non_blank(n, &f.path("config-ref"), "the name of a config key"));
            let target = f.raw("component-ref").and_then(|n| {
                let p = f.path("component-ref");
                let target = self.non_blank(n, &p, "the name of another component")?;
                self.refs.push(PendingRef {
                    target: target.clone(),
                    path: p,
                    pos: n.pos,
                });
                Some(target)
            });

            let source = match (has_value, has_config, has_component) {
                (_, true, false) => EnvSource::ConfigRef {
                    key: config.unwrap_or_default(),
                    default: value,
                },
                (true, false, false) => EnvSource::Value(value.unwrap_or_default()),
                (false, false, true) => EnvSource::ComponentRef(target.unwrap_or_default()),
                (false, false, false) => {
                    self.error(
                        &ep,
                        f.pos,
                        "sets none of value, config-ref, component-ref; use exactly one (config-ref may add a value as its default)",
                    );
                    continue;
                }
                (value, config, true) => {
                    let other = match (value, config) {
                        (true, true) => "value and config-ref",
                        (true, false) => "value",
                        _ => "config-ref",
                    };
                    self.error(
                        &ep,
                        f.pos,
                        format!(
                            "sets component-ref together with {other}; use exactly one of value, \
                             config-ref, component-ref (only config-ref may add a value, as its default)"
                        ),
                    );
                    continue;
                }
            };
            out.push(EnvVar { name, source });
        }
        out
    }

    fn files(&mut self, node: &Node, path: &str) -> Vec<FileMount> {
        let items = self.list(node, path, "files (path plus content or config-ref)");
        let mut out = Vec::with_capacity(items.len());
        let mut seen: Vec<(String, usize)> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let fp = index(path, i);
            let Some(f) = self.fields(item, &fp, FILE_FIELDS) else {
                continue;
            };
            let mut file_path = String::new();
            if let Some(n) = self.required(&f, "path", "an absolute path in the container") {
                let p = f.path("path");
                if let Some(text) = self.text(n, &p, "an absolute path") {
                    self.check(checks::check_container_path(&text), &p, n);
                    if let Some((_, first)) = seen.iter().find(|(s, _)| *s == text) {
                        let message = format!(
                            "{text} is already written by {path}[{first}]; give each file once"
                        );
                        self.error(&p, n.pos, message);
                    } else {
                        seen.push((text.clone(), i));
                    }
                    file_path = text;
                }
            }
            let content = f
                .raw("content")
                .map(|n| self.text_or_empty(n, &f.path("content"), "the file's text"));
            let source = match (content, f.raw("config-ref")) {
                (Some(content), None) => FileSource::Content(content.unwrap_or_default()),
                // Content next to a config-ref is its default, like an env
                // value next to a config-ref.
                (default, Some(n)) => FileSource::ConfigRef {
                    key: self
                        .non_blank(n, &f.path("config-ref"), "the name of a config key")
                        .unwrap_or_default(),
                    default: default.flatten(),
                },
                (None, None) => {
                    self.error(
                        &fp,
                        f.pos,
                        "sets neither content nor config-ref; use content for text in the manifest, config-ref for a key of the stage's config (content next to config-ref is its default)",
                    );
                    continue;
                }
            };
            out.push(FileMount {
                path: file_path,
                source,
            });
        }
        out
    }

    fn resources(&mut self, node: &Node, path: &str) -> Resources {
        let mut resources = Resources::default();
        let Some(f) = self.fields(node, path, RESOURCES_FIELDS) else {
            return resources;
        };
        if let Some(n) = f.get("cpu") {
            let p = f.path("cpu");
            if let Some(text) = self.text(n, &p, "a CPU quantity like 500m or 2") {
                match text.parse::<CpuQuantity>() {
                    Ok(q) => resources.cpu = Some(q),
                    Err(message) => self.error(&p, n.pos, message),
                }
            }
        }
        if let Some(n) = f.get("memory") {
            resources.memory = self.bytes(n, &f.path("memory"));
        }
        resources
    }

    fn bytes(&mut self, node: &Node, path: &str) -> Option<ByteQuantity> {
        let text = self.text(node, path, "a byte quantity like 512Mi or 2Gi")?;
        match text.parse::<ByteQuantity>() {
            Ok(q) => Some(q),
            Err(message) => {
                self.error(path, node.pos, message);
                None
            }
        }
    }

    fn scaling(&mut self, node: &Node, path: &str) -> Option<Scaling> {
        let f = self.fields(node, path, SCALING_FIELDS)?;
        let min = self
            .required(&f, "min", "the fewest replicas, 0 or more")
            .and_then(|n| self.count(n, &f.path("min"), "the fewest replicas"));
        let max = self
            .required(&f, "max", "the most replicas, at least min")
            .and_then(|n| self.count(n, &f.path("max"), "the most replicas"));
        let (min, max) = (min?, max?);
        if min > max {
            self.error(
                path,
                f.pos,
                format!("min {min} is greater than max {max}; min must be at most max"),
            );
        }
        Some(Scaling { min, max })
    }

    /// `devices`: a list of `{name}`, each a name the outpost offers a
    /// device under. Host paths are refused with the reason: the manifest
    /// must run on outposts wired differently.
    fn devices(&mut self, node: &Node, path: &str) -> Vec<DeviceRequest> {
        let items = self.list(
            node,
            path,
            "devices, each `- name: <a device the outpost offers>`",
        );
        let mut out: Vec<DeviceRequest> = Vec::with_capacity(items.len());
        let mut seen: Vec<(String, usize)> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let dp = index(path, i);
            if let Value::Scalar(s) = &item.value
                && !s.is_null()
            {
                let message = if looks_like_host_path(&s.text) {
                    host_path_message(&s.text)
                } else {
                    format!(
                        "expected a mapping with the field name, found the text {:?}; write - name: {}",
                        s.text, s.text
                    )
                };
                self.error(&dp, item.pos, message);
                continue;
            }
            let Some(f) = self.fields(item, &dp, DEVICE_FIELDS) else {
                continue;
            };
            let Some(n) = self.required(
                &f,
                "name",
                "the name the outpost offers the device under, like camera",
            ) else {
                continue;
            };
            let p = f.path("name");
            let Some(name) = self.text(n, &p, "a device name like camera") else {
                continue;
            };
            if looks_like_host_path(&name) {
                self.error(&p, n.pos, host_path_message(&name));
                continue;
            }
            if let Err(err) = validate_name(NameKind::Device, &name) {
                self.error(&p, n.pos, err.to_string());
                continue;
            }
            if let Some((_, first)) = seen.iter().find(|(s, _)| *s == name) {
                let message = format!(
                    "device {name:?} is already listed as {path}[{first}]; list each device once"
                );
                self.error(&p, n.pos, message);
                continue;
            }
            seen.push((name.clone(), i));
            out.push(DeviceRequest { name });
        }
        out
    }

    fn storage(&mut self, node: &Node, path: &str) -> Vec<Storage> {
        let items = self.list(node, path, "volumes (name, path, size, type)");
        let mut out: Vec<Storage> = Vec::with_capacity(items.len());
        let mut names: Vec<(String, usize)> = Vec::new();
        let mut paths: Vec<(String, usize)> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let sp = index(path, i);
            let Some(f) = self.fields(item, &sp, STORAGE_FIELDS) else {
                continue;
            };
            let mut storage = Storage {
                name: String::new(),
                path: String::new(),
                size: None,
                kind: StorageKind::Standard,
            };
            if let Some(n) = self.required(&f, "name", "a DNS label like data") {
                let p = f.path("name");
                if let Some(name) = self.text(n, &p, "a storage name") {
                    if let Err(err) = validate_name(NameKind::Storage, &name) {
                        self.error(&p, n.pos, err.to_string());
                    } else if let Some((_, first)) = names.iter().find(|(s, _)| *s == name) {
                        let message = format!(
                            "storage name {name:?} is already used by {path}[{first}]; names must be unique within a component"
                        );
                        self.error(&p, n.pos, message);
                    } else {
                        names.push((name.clone(), i));
                    }
                    storage.name = name;
                }
            }
            if let Some(n) = self.required(&f, "path", "an absolute path in the container") {
                let p = f.path("path");
                if let Some(text) = self.text(n, &p, "an absolute path") {
                    self.check(checks::check_container_path(&text), &p, n);
                    if let Some((_, first)) = paths.iter().find(|(s, _)| *s == text) {
                        let message = format!(
                            "{text} is already mounted by {path}[{first}]; mount each path once"
                        );
                        self.error(&p, n.pos, message);
                    } else {
                        paths.push((text.clone(), i));
                    }
                    storage.path = text;
                }
            }
            if self.strictness == Strictness::Recorded && !f.has("size") {
                // Sizes became required later; see `Strictness::Recorded`.
            } else if let Some(n) = self.required(&f, "size", "a size like 1Gi or 500Mi") {
                storage.size = self.bytes(n, &f.path("size"));
            }
            if let Some(n) = f.get("type") {
                let p = f.path("type");
                if let Some(text) = self.text(n, &p, "standard, premium, temporary or memory") {
                    match text.as_str() {
                        "standard" => storage.kind = StorageKind::Standard,
                        "premium" => storage.kind = StorageKind::Premium,
                        "temporary" => storage.kind = StorageKind::Temporary,
                        "memory" => storage.kind = StorageKind::Memory,
                        other => self.error(
                            &p,
                            n.pos,
                            format!(
                                "{other:?} is not a storage type; \
                                 use standard, premium, temporary or memory"
                            ),
                        ),
                    }
                }
            }
            out.push(storage);
        }
        out
    }
}

/// Whether a device name is really a path of the host (`/dev/video0`,
/// `dev/ttyUSB0`).
fn looks_like_host_path(text: &str) -> bool {
    text.contains('/')
}

fn host_path_message(text: &str) -> String {
    format!(
        "{text:?} is a path on a host; a component names a device by the name the outpost offers it under \
         (like - name: camera), so the manifest runs on outposts wired differently; \
         `trellis validate outpost-uri` lists the devices an outpost offers"
    )
}

/// Where a component's name is written, or the component itself if the name
/// is not there.
fn name_pos(component: &Node) -> Pos {
    if let Value::Map(entries) = &component.value {
        for entry in entries {
            if matches!(&entry.key.value, Value::Scalar(s) if s.text == "name") {
                return entry.value.pos;
            }
        }
    }
    component.pos
}
