//! The manifest of a backup: what a stage's volumes held, file by file,
//! each file's content as a list of chunks. Stored on the hub as a chunk of
//! its own (JSON), named in the backup's record; its chunks are what keeps
//! a backup's content through garbage collection.

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{CasError, Result};

/// The `format` every backup manifest of this version carries.
pub const BACKUP_FORMAT: &str = "trellis-backup-v1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupManifest {
    pub format: String,
    pub volumes: Vec<BackupVolume>,
}

/// One volume: `component/storage` for a process component's storage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupVolume {
    pub name: String,
    /// Sorted by path, parents before children.
    pub entries: Vec<BackupEntry>,
}

/// One file, directory or symbolic link in a volume; `path` is relative to
/// the volume's root, `/`-separated, never `..` or absolute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupEntry {
    pub path: String,
    pub kind: EntryKind,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Content bytes (files).
    #[serde(default)]
    pub size: u64,
    /// The content's chunks in order (files).
    #[serde(default, with = "digests", skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<Digest>,
    /// Where a symbolic link points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
}

mod digests {
    use super::Digest;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &[Digest], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(d.iter().map(Digest::as_hex))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Digest>, D::Error> {
        let hex: Vec<String> = Vec::deserialize(d)?;
        hex.iter()
            .map(|h| h.parse().map_err(serde::de::Error::custom))
            .collect()
    }
}

impl BackupManifest {
    pub fn to_bytes(&self) -> Vec<u8> {
        // Plain data with string keys: serialising cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a manifest and checks what a restore relies on: the format,
    /// safe relative paths, sizes that match no more than the chunks can.
    pub fn parse(bytes: &[u8]) -> Result<BackupManifest> {
        let bad = |reason: String| CasError::BadBackupManifest { reason };
        let manifest: BackupManifest =
            serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if manifest.format != BACKUP_FORMAT {
            return Err(bad(format!(
                "format {:?}, expected {BACKUP_FORMAT:?}",
                manifest.format
            )));
        }
        for volume in &manifest.volumes {
            if !safe_relative(&volume.name) || volume.name.split('/').count() != 2 {
                return Err(bad(format!(
                    "volume name {:?} is not component/storage",
                    volume.name
                )));
            }
            for entry in &volume.entries {
                if !safe_relative(&entry.path) {
                    return Err(bad(format!(
                        "path {:?} in volume {} leaves the volume",
                        entry.path, volume.name
                    )));
                }
                if entry.kind == EntryKind::Symlink && entry.target.is_none() {
                    return Err(bad(format!("symbolic link {:?} has no target", entry.path)));
                }
            }
        }
        Ok(manifest)
    }

    /// Every chunk it lists, each once.
    pub fn chunks(&self) -> Vec<Digest> {
        let mut seen = std::collections::HashSet::new();
        self.volumes
            .iter()
            .flat_map(|v| &v.entries)
            .flat_map(|e| &e.chunks)
            .filter(|d| seen.insert(**d))
            .copied()
            .collect()
    }

    /// Bytes of file content.
    pub fn size(&self) -> u64 {
        self.volumes
            .iter()
            .flat_map(|v| &v.entries)
            .map(|e| e.size)
            .sum()
    }
}

/// Relative, `/`-separated, no empty, `.` or `..` parts.
fn safe_relative(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && !path.contains('\0')
        && path
            .split('/')
            .all(|p| !p.is_empty() && p != "." && p != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(path: &str) -> BackupManifest {
        BackupManifest {
            format: BACKUP_FORMAT.into(),
            volumes: vec![BackupVolume {
                name: "db/data".into(),
                entries: vec![BackupEntry {
                    path: path.into(),
                    kind: EntryKind::File,
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                    size: 3,
                    chunks: vec![Digest::of(b"abc"), Digest::of(b"abc")],
                    target: None,
                }],
            }],
        }
    }

    #[test]
    fn round_trips_and_refuses_escapes() {
        let m = manifest("a/b.txt");
        assert_eq!(BackupManifest::parse(&m.to_bytes()).unwrap(), m);
        assert_eq!(m.chunks(), vec![Digest::of(b"abc")]);
        for bad in ["../x", "/etc/passwd", "a//b", "a/./b", ""] {
            let err = BackupManifest::parse(&manifest(bad).to_bytes()).unwrap_err();
            assert!(err.to_string().contains("backup manifest"), "{bad}: {err}");
        }
    }
}
