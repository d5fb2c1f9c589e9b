//! The path parameters of the API, described once for the OpenAPI document.
//!
//! Handlers read their paths as tuples; these structs only say what each
//! segment is (`params(StagePath)` in a route's `#[utoipa::path]`), with
//! the rules the handlers apply, so that a client generated from the
//! document sends what the hub accepts. The names match the `{…}` in the
//! routes' paths.

use serde::Deserialize;
use utoipa::IntoParams;

/// What every name a user gives (project, stage, config, component,
/// outpost, user) must look like: a DNS label, as
/// [`trellis_model::validate_name`] checks it.
pub const NAME_PATTERN: &str = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$";

/// A BLAKE3 digest as the artifact store names chunks and artifacts.
pub const DIGEST_PATTERN: &str = "^[0-9a-f]{64}$";

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ProjectPath {
    /// The project's name
    #[param(pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$", example = "shop")]
    pub project: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct StagePath {
    /// The project's name
    #[param(pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$", example = "shop")]
    pub project: String,
    /// The stage's name
    #[param(pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$", example = "dev")]
    pub stage: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ConfigPath {
    /// The project's name
    #[param(pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$", example = "shop")]
    pub project: String,
    /// The stage's name
    #[param(pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$", example = "dev")]
    pub stage: String,
    /// The config's name
    #[param(pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$", example = "app")]
    pub config: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ConfigKeyPath {
    /// The project's name
    #[param(pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$", example = "shop")]
    pub project: String,
    /// The stage's name
    #[param(pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$", example = "dev")]
    pub stage: String,
    /// The config's name
    #[param(pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$", example = "app")]
    pub config: String,
    /// An env key or a file name of the config
    #[param(pattern = "^[^/]+$", example = "LOG_LEVEL")]
    pub key: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ReleasePath {
    /// The project's name
    #[param(pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$", example = "shop")]
    pub project: String,
    /// The stage's name
    #[param(pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$", example = "dev")]
    pub stage: String,
    /// The release's number on its stage (1, 2, …)
    #[param(minimum = 1, example = 1)]
    pub number: u64,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ComponentActionPath {
    /// The project's name
    #[param(pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$", example = "shop")]
    pub project: String,
    /// The stage's name
    #[param(pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$", example = "dev")]
    pub stage: String,
    /// A component of the manifest of the stage's latest release
    #[param(pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$", example = "web")]
    pub component: String,
    /// What to do with it
    #[param(inline)]
    pub action: PathAction,
}

/// The actions a component's path names (a kill is `stop?kill=true`).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PathAction {
    Start,
    Stop,
    Restart,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct BuildPath {
    /// The project's name
    #[param(pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$", example = "shop")]
    pub project: String,
    /// The build's name, `<branch>_b<number>`
    #[param(min_length = 1, max_length = 300, example = "main_b1")]
    pub build: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct MemberPath {
    /// The project's name
    #[param(pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$", example = "shop")]
    pub project: String,
    /// The member's user name
    #[param(pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$", example = "alice")]
    pub user: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct OutpostPath {
    /// The outpost's name
    #[param(pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$", example = "factory-7")]
    pub outpost: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct UserPath {
    /// The user's name
    #[param(pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$", example = "alice")]
    pub user: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct KeyPath {
    /// The key's id, the part of the key before `:`
    #[param(min_length = 1, max_length = 64, example = "tk_0123456789abcdef")]
    pub id: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct DigestPath {
    /// BLAKE3 digest of the chunk's content: 64 lowercase hexadecimal
    /// characters
    #[param(pattern = "^[0-9a-f]{64}$")]
    pub digest: String,
}

/// What `trellis_model::agent_binary::check_arch` accepts.
pub const ARCH_PATTERN: &str = "^(x86_64|aarch64|arm|riscv64|x86|powerpc64|s390x|loongarch64)$";

/// What `trellis_model::agent_binary::check_version` accepts (it also
/// caps the length at 64, which `max_length` says).
pub const VERSION_PATTERN: &str = "^[0-9]{1,9}\\.[0-9]{1,9}\\.[0-9]{1,9}([-+][0-9A-Za-z.+-]+)?$";

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct AgentBinaryPath {
    /// The agent's version, as `trellis-agent --version` prints it
    #[param(
        pattern = "^[0-9]{1,9}\\.[0-9]{1,9}\\.[0-9]{1,9}([-+][0-9A-Za-z.+-]+)?$",
        max_length = 64,
        example = "0.1.0"
    )]
    pub version: String,
    /// The CPU architecture as Rust names it (`uname -m` on most hosts)
    #[param(
        pattern = "^(x86_64|aarch64|arm|riscv64|x86|powerpc64|s390x|loongarch64)$",
        example = "x86_64"
    )]
    pub arch: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct IndexPath {
    /// Digest of the artifact's index (64 lowercase hexadecimal characters)
    #[param(pattern = "^[0-9a-f]{64}$")]
    pub index: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The patterns in the document say what the handlers check.
    #[test]
    fn the_patterns_are_the_rules() {
        let name = regex_automata::meta::Regex::new(NAME_PATTERN).unwrap();
        for candidate in [
            "a",
            "web",
            "factory-7",
            "a1",
            &"a".repeat(63),
            "",
            "-a",
            "a-",
            "A",
            "1a",
            &"a".repeat(64),
            "a_b",
            "a b",
            "é",
        ] {
            let valid =
                trellis_model::validate_name(trellis_model::NameKind::Project, candidate).is_ok();
            assert_eq!(valid, name.is_match(candidate), "{candidate:?}");
        }
        let version = regex_automata::meta::Regex::new(VERSION_PATTERN).unwrap();
        for candidate in [
            "0.1.0",
            "1.22.333-rc.1+x",
            "1.2.3-",
            "1.2",
            "v1.2.3",
            "1234567890.0.0",
            "1.2.3 x",
        ] {
            let valid = trellis_model::agent_binary::check_version(candidate).is_ok();
            assert_eq!(valid, version.is_match(candidate), "{candidate:?}");
        }
        let arch = regex_automata::meta::Regex::new(ARCH_PATTERN).unwrap();
        for (candidate, _, _) in trellis_model::agent_binary::ARCHES {
            assert!(arch.is_match(candidate), "{candidate}");
        }
        for candidate in ["amd64", "mips", "x86_64 ", ""] {
            assert!(trellis_model::agent_binary::check_arch(candidate).is_err());
            assert!(!arch.is_match(candidate), "{candidate:?}");
        }
        let digest = regex_automata::meta::Regex::new(DIGEST_PATTERN).unwrap();
        for candidate in [
            "ab".repeat(32),
            "AB".repeat(32),
            "ab".repeat(31),
            "g".repeat(64),
        ] {
            let valid = candidate.parse::<trellis_cas::Digest>().is_ok();
            assert_eq!(valid, digest.is_match(&candidate), "{candidate:?}");
        }
    }

    /// Every agent version the document takes, in a path or a body, carries
    /// the pattern the handlers check (the attributes repeat it literally).
    #[test]
    fn every_version_in_the_document_has_the_pattern() {
        let document = super::super::document();
        let path_version =
            &document["paths"]["/agent-binaries/{version}/{arch}"]["put"]["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == "version")
                .unwrap()["schema"];
        let body_version = &document["components"]["schemas"]["CreateAgentUpdatesRequest"]["properties"]
            ["version"];
        for schema in [path_version, body_version] {
            assert_eq!(schema["pattern"], VERSION_PATTERN, "{schema}");
            assert_eq!(schema["maxLength"], 64, "{schema}");
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct BackupPath {
    /// The project's name
    #[param(pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$", example = "shop")]
    pub project: String,
    /// The stage's name
    #[param(pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$", example = "dev")]
    pub stage: String,
    /// The backup's id (`trellis list backup` shows them)
    #[param(minimum = 1, example = 1)]
    pub id: u64,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct BackupChunkPath {
    /// The project's name
    #[param(pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$", example = "shop")]
    pub project: String,
    /// The stage's name
    #[param(pattern = "^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$", example = "dev")]
    pub stage: String,
    /// The backup's id
    #[param(minimum = 1, example = 1)]
    pub id: u64,
    /// BLAKE3 digest of the chunk's content: 64 lowercase hexadecimal
    /// characters
    #[param(pattern = "^[0-9a-f]{64}$")]
    pub digest: String,
}
