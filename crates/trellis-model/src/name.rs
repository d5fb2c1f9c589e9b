//! Names of things users create: projects, stages, components, outposts,
//! configs and users all follow the same DNS-label rule, so that any of them
//! can become part of a host name, a container name or a directory name on an
//! outpost without escaping.

use std::fmt;

/// What kind of thing a name is for; used only to make errors precise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    Project,
    Stage,
    Component,
    Outpost,
    Config,
    User,
    Storage,
    /// A device an outpost offers (`--device camera=/dev/video0`).
    Device,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::Project => "project",
            NameKind::Stage => "stage",
            NameKind::Component => "component",
            NameKind::Outpost => "outpost",
            NameKind::Config => "config",
            NameKind::User => "user",
            NameKind::Storage => "storage",
            NameKind::Device => "device",
        })
    }
}

/// The longest name accepted (the DNS label limit).
pub const MAX_NAME_LEN: usize = 63;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{kind} name {name:?} is not valid: {reason}; use 1-63 lowercase letters, digits and '-', starting with a letter and not ending with '-'"
)]
pub struct NameError {
    pub kind: NameKind,
    pub name: String,
    pub reason: &'static str,
}

/// Checks that `name` is a DNS label: 1–63 characters of `a-z`, `0-9` and
/// `-`, starting with a letter and not ending with `-`.
pub fn validate_name(kind: NameKind, name: &str) -> Result<(), NameError> {
    let fail = |reason| {
        Err(NameError {
            kind,
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return fail("it is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return fail("it is longer than 63 characters");
    }
    if !name.as_bytes()[0].is_ascii_lowercase() {
        return fail("it does not start with a lowercase letter");
    }
    if name.ends_with('-') {
        return fail("it ends with '-'");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return fail("it contains a character other than a-z, 0-9 and '-'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels() {
        for ok in ["a", "web", "sensor-bridge", "a1", &"x".repeat(63)] {
            assert!(validate_name(NameKind::Component, ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_everything_else_with_a_reason() {
        for bad in [
            "",
            "Web",
            "1web",
            "web-",
            "web_app",
            "wéb",
            "a b",
            &"x".repeat(64),
        ] {
            let err = validate_name(NameKind::Stage, bad).unwrap_err();
            assert!(err.to_string().starts_with("stage name"), "{err}");
        }
    }
}
