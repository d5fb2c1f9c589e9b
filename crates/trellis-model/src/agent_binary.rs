//! Agent binaries the hub holds, one per (version, architecture), so it can
//! install agents on outposts that reach nothing but the hub and update
//! them later.
//!
//! Architectures are named as Rust names them (`std::env::consts::ARCH`:
//! `x86_64`, `aarch64`, `arm`, `riscv64`, …), because that is what an agent
//! knows about itself; [`arch_from_uname`] maps what `uname -m` prints to
//! those names (the install script does the same in `sh`). Which machine a
//! binary is built for is read from its ELF header ([`elf_arch`]), so a
//! binary uploaded under the wrong architecture is refused before anything
//! is stored.

use serde::{Deserialize, Serialize};

/// An agent binary as the hub records it. The bytes live in the hub's
/// artifact store as an artifact of kind `binary` named by `manifest` (the
/// digest of its chunk index), fetched like any release artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AgentBinary {
    /// What the binary reports with `--version` (see [`check_version`]).
    pub version: String,
    /// `x86_64`, `aarch64`, … (see the module docs).
    pub arch: String,
    /// Bytes of the binary.
    pub size: u64,
    /// BLAKE3 of the whole binary, hexadecimal.
    pub blake3: String,
    /// SHA-256 of the whole binary, hexadecimal: what a shell script can
    /// check with `sha256sum` where no BLAKE3 tool is installed.
    pub sha256: String,
    /// The digest of the artifact index listing the binary's chunks.
    pub manifest: String,
    pub uploaded_at: chrono::DateTime<chrono::Utc>,
    /// Who uploaded it (`hub` for a binary the hub registered at start).
    pub uploaded_by: String,
}

/// The longest version string accepted.
pub const MAX_VERSION_LEN: usize = 64;

/// Why a version string is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{version:?} is not an agent version: {reason}; give it as MAJOR.MINOR.PATCH with an optional -pre-release or +build part, e.g. 0.4.1 or 0.5.0-rc.1 (what `trellis-agent --version` prints)"
)]
pub struct VersionError {
    pub version: String,
    pub reason: &'static str,
}

/// Checks a version string: `MAJOR.MINOR.PATCH` (decimal numbers) followed
/// optionally by `-` or `+` and letters, digits, `.`, `-`, `+`. At most
/// [`MAX_VERSION_LEN`] bytes. A version becomes a URL path segment and a
/// file name, so nothing else is let through.
pub fn check_version(version: &str) -> Result<(), VersionError> {
    let fail = |reason| {
        Err(VersionError {
            version: version.chars().take(MAX_VERSION_LEN + 8).collect(),
            reason,
        })
    };
    if version.is_empty() {
        return fail("it is empty");
    }
    if version.len() > MAX_VERSION_LEN {
        return fail("it is longer than 64 characters");
    }
    let (core, rest) = match version.find(['-', '+']) {
        Some(at) => version.split_at(at),
        None => (version, ""),
    };
    let numbers: Vec<&str> = core.split('.').collect();
    if numbers.len() != 3 {
        return fail("it does not have three dot-separated numbers");
    }
    if numbers
        .iter()
        .any(|n| n.is_empty() || n.len() > 9 || !n.bytes().all(|b| b.is_ascii_digit()))
    {
        return fail("MAJOR, MINOR and PATCH must be decimal numbers");
    }
    if rest.len() == 1 {
        return fail("nothing follows the - or +");
    }
    if !rest
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+'))
    {
        return fail(
            "the part after MAJOR.MINOR.PATCH may hold only letters, digits, '.', '-' and '+'",
        );
    }
    Ok(())
}

/// Orders versions as semantic versioning does for what [`check_version`]
/// accepts: by MAJOR, MINOR, PATCH numerically, a pre-release before its
/// release, pre-releases by their text. Build metadata (`+…`) breaks ties
/// by text so the order is total.
pub fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(v: &str) -> ([u64; 3], Option<&str>, &str) {
        let (head, build) = v.split_once('+').unwrap_or((v, ""));
        let (core, pre) = match head.split_once('-') {
            Some((core, pre)) => (core, Some(pre)),
            None => (head, None),
        };
        let mut numbers = [0u64; 3];
        for (slot, n) in numbers.iter_mut().zip(core.split('.')) {
            *slot = n.parse().unwrap_or(0);
        }
        (numbers, pre, build)
    }
    let (na, pa, ba) = parts(a);
    let (nb, pb, bb) = parts(b);
    na.cmp(&nb)
        .then_with(|| match (pa, pb) {
            (None, None) => std::cmp::Ordering::Equal,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some(_), None) => std::cmp::Ordering::Less,
            (Some(x), Some(y)) => x.cmp(y),
        })
        .then_with(|| ba.cmp(bb))
}

/// The architectures the hub accepts agent binaries for, as Rust names
/// them, with the ELF `e_machine` (and class: 64-bit or not) of each.
pub const ARCHES: &[(&str, u16, bool)] = &[
    ("x86_64", 62, true),
    ("aarch64", 183, true),
    ("arm", 40, false),
    ("riscv64", 243, true),
    ("x86", 3, false),
    ("powerpc64", 21, true),
    ("s390x", 22, true),
    ("loongarch64", 258, true),
];

/// Why an architecture name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not an architecture agent binaries are held for; use one of x86_64, aarch64, arm, riscv64, x86, powerpc64, s390x, loongarch64 (as Rust's std::env::consts::ARCH names them)"
)]
pub struct ArchError(pub String);

/// Checks an architecture name against [`ARCHES`].
pub fn check_arch(arch: &str) -> Result<(), ArchError> {
    if ARCHES.iter().any(|(name, _, _)| *name == arch) {
        Ok(())
    } else {
        Err(ArchError(arch.chars().take(64).collect()))
    }
}

/// The architecture name of what an outpost reports, which is OCI's
/// (`amd64` → `x86_64`, `arm64` → `aarch64`): the inverse of
/// [`crate::manifest::Arch::oci_name`].
pub fn arch_from_oci(oci: &str) -> &str {
    match oci {
        "amd64" => "x86_64",
        "arm64" => "aarch64",
        "386" => "x86",
        "ppc64le" => "powerpc64",
        other => other,
    }
}

/// The architecture name of what `uname -m` prints (`armv7l` → `arm`,
/// `arm64` → `aarch64`, …); `None` for a machine no agent is built for.
pub fn arch_from_uname(machine: &str) -> Option<&'static str> {
    Some(match machine {
        "x86_64" | "amd64" => "x86_64",
        "aarch64" | "arm64" | "armv8l" => "aarch64",
        m if m.starts_with("armv") => "arm",
        "riscv64" => "riscv64",
        "i386" | "i486" | "i586" | "i686" => "x86",
        "ppc64le" | "ppc64" => "powerpc64",
        "s390x" => "s390x",
        "loongarch64" => "loongarch64",
        _ => return None,
    })
}

/// Why bytes are not an agent binary.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    #[error("it is empty")]
    Empty,
    #[error("it is not an ELF executable (it does not start with \\x7fELF)")]
    NotElf,
    #[error("its ELF header is cut short")]
    Truncated,
    #[error("it is an ELF file but not an executable (ELF type {0})")]
    NotExecutable(u16),
    #[error(
        "it is built for a machine no agent binaries are held for (ELF machine {machine}, {bits}-bit)"
    )]
    UnknownMachine { machine: u16, bits: u8 },
}

impl ElfError {
    /// A stable code for the API.
    pub fn code(&self) -> &'static str {
        match self {
            ElfError::Empty => "empty-binary",
            ElfError::UnknownMachine { .. } => "unknown-arch",
            _ => "not-an-executable",
        }
    }
}

/// The architecture an ELF executable is built for, read from its header
/// (the first 20 bytes are enough).
pub fn elf_arch(bytes: &[u8]) -> Result<&'static str, ElfError> {
    if bytes.is_empty() {
        return Err(ElfError::Empty);
    }
    if !bytes.starts_with(b"\x7fELF") {
        return Err(ElfError::NotElf);
    }
    if bytes.len() < 20 {
        return Err(ElfError::Truncated);
    }
    let class64 = match bytes[4] {
        1 => false,
        2 => true,
        _ => return Err(ElfError::NotElf),
    };
    let read16 = |at: usize| match bytes[5] {
        1 => Ok(u16::from_le_bytes([bytes[at], bytes[at + 1]])),
        2 => Ok(u16::from_be_bytes([bytes[at], bytes[at + 1]])),
        _ => Err(ElfError::NotElf),
    };
    let kind = read16(16)?;
    // ET_EXEC, or ET_DYN for position-independent executables.
    if kind != 2 && kind != 3 {
        return Err(ElfError::NotExecutable(kind));
    }
    let machine = read16(18)?;
    ARCHES
        .iter()
        .find(|(_, m, is64)| *m == machine && *is64 == class64)
        .map(|(name, _, _)| *name)
        .ok_or(ElfError::UnknownMachine {
            machine,
            bits: if class64 { 64 } else { 32 },
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(class: u8, data: u8, kind: u16, machine: u16) -> Vec<u8> {
        let mut h = b"\x7fELF".to_vec();
        h.extend([class, data, 1, 0]);
        h.extend([0; 8]);
        if data == 1 {
            h.extend(kind.to_le_bytes());
            h.extend(machine.to_le_bytes());
        } else {
            h.extend(kind.to_be_bytes());
            h.extend(machine.to_be_bytes());
        }
        h.extend([0; 44]);
        h
    }

    #[test]
    fn reads_the_machine_of_elf_executables() {
        assert_eq!(elf_arch(&header(2, 1, 3, 62)), Ok("x86_64"));
        assert_eq!(elf_arch(&header(2, 1, 2, 183)), Ok("aarch64"));
        assert_eq!(elf_arch(&header(1, 1, 2, 40)), Ok("arm"));
        assert_eq!(elf_arch(&header(2, 2, 2, 22)), Ok("s390x"));
        assert_eq!(
            elf_arch(&header(1, 1, 2, 62)),
            Err(ElfError::UnknownMachine {
                machine: 62,
                bits: 32
            })
        );
        assert_eq!(
            elf_arch(&header(2, 1, 1, 62)),
            Err(ElfError::NotExecutable(1))
        );
        assert_eq!(elf_arch(b""), Err(ElfError::Empty));
        assert_eq!(elf_arch(b"#!/bin/sh\necho hi\n"), Err(ElfError::NotElf));
        assert_eq!(elf_arch(b"\x7fELF\x02\x01"), Err(ElfError::Truncated));
    }

    #[test]
    fn this_host_is_one_of_the_architectures() {
        assert!(check_arch(std::env::consts::ARCH).is_ok());
        assert!(check_arch("amd64").is_err());
        assert_eq!(arch_from_uname("armv7l"), Some("arm"));
        assert_eq!(arch_from_uname("arm64"), Some("aarch64"));
        assert_eq!(arch_from_uname("mips"), None);
    }

    #[test]
    fn versions_are_checked_and_ordered() {
        for good in [
            "0.1.0",
            "1.22.333",
            "0.5.0-rc.1",
            "0.5.0+abc",
            "1.0.0-a-b+c.d",
        ] {
            assert_eq!(check_version(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "1",
            "1.2",
            "1.2.3.4",
            "v1.2.3",
            "1.2.x",
            "1.2.3-",
            "1.2.3/../x",
            "1.2.3 x",
            "..",
            "1..3",
        ] {
            assert!(check_version(bad).is_err(), "{bad}");
        }
        assert!(check_version(&format!("1.2.3-{}", "a".repeat(70))).is_err());
        use std::cmp::Ordering::*;
        assert_eq!(compare_versions("0.10.0", "0.9.9"), Greater);
        assert_eq!(compare_versions("1.0.0-rc.1", "1.0.0"), Less);
        assert_eq!(compare_versions("1.0.0", "1.0.0"), Equal);
    }
}
