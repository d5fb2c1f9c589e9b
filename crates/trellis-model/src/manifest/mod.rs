//! The v1 manifest: the file (`trellis.yaml`, or the platform's
//! `pergola.yaml|yml|json`) in which a project lists its components and how
//! each one is built, configured and run.
//!
//! [`parse_manifest`] turns the text into a typed [`Manifest`] or into every
//! problem it found, each naming the field path (`components[2].env[0]`) and
//! the line and column, so a user can fix a manifest in one pass. JSON files
//! go through the same parser: YAML 1.2 is a superset of JSON.
//!
//! # Layout
//! - `yaml`: loads the text into a tree of nodes that keep their positions.
//! - `decode`: walks that tree along the schema, building the types below and
//!   collecting errors.
//! - `checks`: the rules for single values (cron, time zones, paths, …).
//! - `quantity`: CPU and byte quantities (`500m`, `2Gi`).
//! - [`expand`]: dependent variables (`$(NAME)`) in env values, `command`
//!   and `args`, by the rules of Kubernetes, which the platform runs on.

pub(crate) mod checks;
mod decode;
pub mod expand;
mod quantity;
mod yaml;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

pub use quantity::{ByteQuantity, CpuQuantity};

/// The file names a manifest may have at the root of a project, in the order
/// they are looked for.
pub const MANIFEST_FILE_NAMES: [&str; 4] = [
    "trellis.yaml",
    "pergola.yaml",
    "pergola.yml",
    "pergola.json",
];

/// The only manifest version there is.
pub const MANIFEST_VERSION: &str = "v1";

/// Parses and validates a manifest by the platform's rules. On failure,
/// returns every problem found, in source order.
pub fn parse_manifest(text: &str) -> Result<Manifest, ManifestErrors> {
    parse(text, decode::Strictness::New)
}

/// Parses the manifest of a build already recorded: like
/// [`parse_manifest`], but it also takes what earlier Trellis versions
/// accepted (storage without `size`, an ingress without `port` on a
/// component with several ports — it then routes to the first), so every
/// build a hub holds stays runnable after an upgrade. New builds are
/// checked with [`parse_manifest`].
pub fn parse_recorded_manifest(text: &str) -> Result<Manifest, ManifestErrors> {
    parse(text, decode::Strictness::Recorded)
}

fn parse(text: &str, strictness: decode::Strictness) -> Result<Manifest, ManifestErrors> {
    // A byte-order mark is invisible in editors, so columns are counted
    // without it.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    // The YAML parser is third-party code fed with text users push; should
    // it ever panic on some input, that becomes an error here instead of
    // taking down the hub request or agent that parses the manifest.
    let loaded = std::panic::catch_unwind(|| yaml::load(text)).unwrap_or_else(|_| {
        Err(yaml::LoadError {
            pos: yaml::Pos { line: 1, column: 1 },
            message: "the YAML parser failed on this document; please report it as a bug, with the manifest".into(),
        })
    });
    let root = match loaded {
        Ok(Some(root)) => root,
        Ok(None) => {
            return Err(ManifestErrors(vec![ManifestError {
                path: String::new(),
                line: 1,
                column: 1,
                message: "the manifest is empty; it needs `version: v1` and a `components:` list"
                    .into(),
            }]));
        }
        Err(err) => {
            let hint = syntax_hint(text, err.pos);
            return Err(ManifestErrors(vec![ManifestError {
                path: String::new(),
                line: err.pos.line,
                column: err.pos.column,
                message: format!("{}{hint}", err.message),
            }]));
        }
    };
    decode::decode(&root, strictness).map_err(|mut errors| {
        // Sorting is stable, so problems at one position keep the order in
        // which the walker found them.
        errors.sort_by_key(|e| (e.line, e.column));
        ManifestErrors(errors)
    })
}

/// `@` and `*` cannot start a plain YAML value, yet they start both
/// `@release` and most cron schedules; say so where the parser stopped.
fn syntax_hint(text: &str, pos: yaml::Pos) -> &'static str {
    let at = text
        .lines()
        .nth(pos.line.saturating_sub(1))
        .and_then(|line| line.chars().nth(pos.column.saturating_sub(1)));
    match at {
        Some('@') => "; a value starting with @ must be quoted, like scheduled: \"@release\"",
        Some('*') => {
            "; a value starting with * is read as an alias: quote it, like scheduled: \"*/5 * * * *\""
        }
        Some('`') => "; a value starting with ` must be quoted",
        _ => "",
    }
}

/// A parsed, valid manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Manifest {
    /// Always [`MANIFEST_VERSION`].
    pub version: String,
    /// At least one; names are unique.
    pub components: Vec<Component>,
}

impl Manifest {
    /// The component with this name.
    pub fn component(&self, name: &str) -> Option<&Component> {
        self.components.iter().find(|c| c.name == name)
    }

    /// Component names in manifest order.
    pub fn component_names(&self) -> impl Iterator<Item = &str> {
        self.components.iter().map(|c| c.name.as_str())
    }
}

/// One separately running part of the application.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Component {
    /// A DNS label, unique within the manifest.
    pub name: String,
    pub source: ComponentSource,
    /// Distinct, each 1–65535.
    pub ports: Vec<u16>,
    pub ingresses: Vec<Ingress>,
    pub env: Vec<EnvVar>,
    pub files: Vec<FileMount>,
    pub resources: Resources,
    /// Never set on a scheduled component.
    pub scaling: Option<Scaling>,
    pub storage: Vec<Storage>,
    pub scheduled: Option<Schedule>,
    /// An IANA zone name; cron schedules are in UTC without it.
    pub scheduled_timezone: Option<String>,
    pub max_retries: Option<u32>,
    /// Replaces the image's entrypoint; `None` keeps it. Dependent
    /// variables (`$(NAME)`, see [`expand`]) are expanded from `env` when
    /// the component starts.
    pub command: Option<Vec<String>>,
    /// Replaces the image's arguments, expanded like `command`.
    pub args: Option<Vec<String>>,
    /// A uid, `uid:gid` or user name, as written.
    pub user: Option<String>,
    /// A cloud identity of the stage the component runs as (an AWS role, a
    /// GCP service account, an Azure identity), as written.
    pub identity: Option<String>,
    /// Devices of the outpost it needs (a Trellis extension), by the names
    /// the outpost offers them under; distinct, in manifest order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceRequest>,
}

/// A device of the outpost a component asks for (`devices: [{name:
/// camera}]`): named as the outpost's administrator offers it (`camera`,
/// `plc-serial`, `gpu`), never by a host path, so one manifest runs on
/// outposts wired differently.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeviceRequest {
    /// A DNS label: what the outpost offers the device as.
    pub name: String,
}

impl Component {
    /// Whether the component runs on a schedule (cron or once per release)
    /// instead of permanently.
    pub fn is_scheduled(&self) -> bool {
        self.scheduled.is_some()
    }

    /// Whether the component runs as a native process rather than a
    /// container.
    pub fn is_process(&self) -> bool {
        matches!(self.source, ComponentSource::Process(_))
    }

    /// The names of the devices it asks for, in manifest order.
    pub fn device_names(&self) -> impl Iterator<Item = &str> {
        self.devices.iter().map(|d| d.name.as_str())
    }

    /// The names of the components this one's env refers to (its own name
    /// too, when it refers to itself).
    pub fn component_refs(&self) -> impl Iterator<Item = &str> {
        self.env.iter().filter_map(|e| match &e.source {
            EnvSource::ComponentRef(name) => Some(name.as_str()),
            _ => None,
        })
    }
}

/// How a component's program comes to be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum ComponentSource {
    Docker(DockerSource),
    /// A directory of the project run as a native process, for hosts
    /// without a container engine.
    Process(ProcessSource),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DockerSource {
    pub build: DockerBuild,
    /// The architectures the image is built for and may run on, distinct,
    /// in manifest order (`platform: [{arch: amd64}, {arch: arm64}]`).
    /// Empty: the build machine's own, and outposts run whatever the build
    /// made.
    #[serde(default)]
    pub platforms: Vec<Arch>,
}

/// A CPU architecture of container images, named as OCI platforms name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    /// Every architecture a manifest may list.
    pub const ALL: [Arch; 2] = [Arch::Amd64, Arch::Arm64];

    /// `amd64` or `arm64`.
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// The engine's platform, e.g. `linux/arm64` (`--platform`).
    pub fn platform(self) -> String {
        format!("linux/{}", self.as_str())
    }

    /// The OCI name of a CPU architecture as Rust names it
    /// (`std::env::consts::ARCH`): `x86_64` is `amd64`, `aarch64` is
    /// `arm64`; others keep their name.
    pub fn oci_name(rust_arch: &str) -> &str {
        match rust_arch {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Arch {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Arch::ALL
            .into_iter()
            .find(|a| a.as_str() == text)
            .ok_or_else(|| format!("{text:?} is not an architecture; use amd64 or arm64"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum DockerBuild {
    /// A ready image, e.g. `postgres:16`.
    Image(String),
    /// An image built from a Dockerfile in the project.
    Dockerfile {
        /// The Dockerfile's path in the project.
        file: String,
        /// The build context directory; the project root when `None`.
        context: Option<String>,
        args: BTreeMap<String, String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProcessSource {
    /// A directory relative to the project root that stays inside it; it is
    /// packaged into the build and the command runs from inside it.
    pub path: String,
    /// The program and its arguments; never empty.
    pub command: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Ingress {
    pub host: String,
    /// One of the component's ports; the first port when `None`.
    pub port: Option<u16>,
    /// A URL path prefix starting with `/`.
    pub path: Option<String>,
    pub sticky: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnvVar {
    pub name: String,
    pub source: EnvSource,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum EnvSource {
    /// A literal; numbers and booleans are kept as written. Dependent
    /// variables (`$(NAME)`) in it are expanded when the component starts.
    Value(String),
    /// A key of the stage's config; `default` is used when the config lacks
    /// it (written as `config-ref` plus `value`), and without a default the
    /// variable is empty then: a missing key does not fail a release.
    ConfigRef {
        key: String,
        default: Option<String>,
    },
    /// The host name at which a component of the stage is reached (no
    /// scheme, no port); it may name the component itself.
    ComponentRef(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FileMount {
    /// Absolute, inside the container.
    pub path: String,
    pub source: FileSource,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum FileSource {
    Content(String),
    /// A key of the stage's config whose value becomes the file; `default`
    /// is used when the config lacks it (written as `config-ref` plus
    /// `content`).
    ConfigRef {
        key: String,
        default: Option<String>,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Resources {
    pub cpu: Option<CpuQuantity>,
    pub memory: Option<ByteQuantity>,
}

/// Replica bounds; `min <= max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Scaling {
    pub min: u32,
    pub max: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Storage {
    /// A DNS label, unique within the component.
    pub name: String,
    /// Absolute mount path inside the container.
    pub path: String,
    /// Always set by [`parse_manifest`]; absent only in builds recorded
    /// before sizes were required ([`parse_recorded_manifest`]).
    pub size: Option<ByteQuantity>,
    #[serde(rename = "type")]
    pub kind: StorageKind,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    /// Persistent, outlives releases.
    #[default]
    Standard,
    /// Persistent on faster media where the outpost has it.
    Premium,
    /// Lives as long as the running component.
    Temporary,
    /// In memory (tmpfs); lives as long as the running component.
    Memory,
}

impl StorageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StorageKind::Standard => "standard",
            StorageKind::Premium => "premium",
            StorageKind::Temporary => "temporary",
            StorageKind::Memory => "memory",
        }
    }
}

impl fmt::Display for StorageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When a scheduled component runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// A five-field cron expression (or a nickname like `@daily`), as
    /// written; it has been checked to parse.
    Cron(String),
    /// Once for every release deployed to the stage (`@release`).
    OnRelease,
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Cron(expr) => f.write_str(expr),
            Schedule::OnRelease => f.write_str("@release"),
        }
    }
}

/// One problem in a manifest, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ManifestError {
    /// The field path, like `components[2].env[0].name`; empty for the whole
    /// document (and for YAML syntax errors).
    pub path: String,
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}: ", self.line, self.column)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ManifestError {}

/// Every problem found in a manifest, in source order; never empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ManifestErrors(pub Vec<ManifestError>);

impl ManifestErrors {
    pub fn iter(&self) -> std::slice::Iter<'_, ManifestError> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a> IntoIterator for &'a ManifestErrors {
    type Item = &'a ManifestError;
    type IntoIter = std::slice::Iter<'a, ManifestError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl fmt::Display for ManifestErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, err) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{err}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ManifestErrors {}

#[cfg(test)]
mod tests;
