//! The one error type of the crate.
//!
//! Messages are shown to people running hubs and agents, so each says what
//! happened, on which path or digest, and what to try. Underlying I/O errors
//! are kept as the `source` and also quoted in the message, as elsewhere in
//! Trellis, so that a log line that prints only the top error still says why.

use std::io;
use std::path::PathBuf;

use crate::digest::Digest;

/// Why a store, pack or unpack operation did not happen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CasError {
    /// Text that was supposed to be a digest is not one.
    #[error(
        "{input:?} is not a digest: {reason}; a digest is 64 lowercase hexadecimal characters (a BLAKE3 hash), as printed by trellis"
    )]
    InvalidDigest { input: String, reason: String },

    /// A backup manifest that is not one, or that a restore must not follow.
    #[error("not a usable backup manifest: {reason}")]
    BadBackupManifest { reason: String },

    /// A filesystem operation failed. `action` says what was being done.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The chunk is not in the store.
    #[error(
        "{digest} is not in the store at {}; store or fetch it first",
        root.display()
    )]
    NotFound { digest: Digest, root: PathBuf },

    /// A stored chunk no longer matches its digest (disk damage, or someone
    /// edited the file).
    #[error(
        "chunk {digest} is corrupt: its content in {} hashes to {actual}; delete it so that it is stored or fetched again",
        path.display()
    )]
    Corrupt {
        digest: Digest,
        actual: Digest,
        path: PathBuf,
    },

    /// Content received for a chunk does not hash to the chunk's name.
    /// Nothing was stored.
    #[error(
        "expected chunk {expected} but the {size} bytes received hash to {actual}; nothing was stored. The transfer was cut short or damaged, or the digest is wrong: fetch it again"
    )]
    DigestMismatch {
        expected: Digest,
        actual: Digest,
        size: u64,
    },

    /// `pack_dir` was given something other than a directory.
    #[error("cannot pack {}: it is not a directory", path.display())]
    NotADirectory { path: PathBuf },

    /// The directory to pack holds a socket, fifo or device.
    #[error(
        "cannot pack {}: {} is a {kind}; packages may hold only files, directories and symlinks",
        dir.display(),
        path.display()
    )]
    UnsupportedFile {
        dir: PathBuf,
        path: PathBuf,
        kind: &'static str,
    },

    /// The directory to pack holds a symlink that would not work (or would
    /// reach outside the package) once unpacked elsewhere.
    #[error(
        "cannot pack {}: symlink {} points to {target:?}, which {reason}; symlinks in a package must be relative and stay inside it",
        dir.display(),
        path.display()
    )]
    SymlinkEscapes {
        dir: PathBuf,
        path: PathBuf,
        target: PathBuf,
        reason: String,
    },

    /// A file changed size while it was being read, so the package would not
    /// describe any real state of the directory.
    #[error(
        "cannot pack {}: {} changed while it was being packed; pack again once nothing is writing to the directory",
        dir.display(),
        path.display()
    )]
    ChangedWhilePacking { dir: PathBuf, path: PathBuf },

    /// Writing the packed stream to its destination failed.
    #[error("cannot pack {}: writing the package failed: {source}", dir.display())]
    PackWrite {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The package holds an entry that could write outside the destination,
    /// or that `pack_dir` would never produce.
    #[error(
        "refusing to unpack into {}: entry {entry:?} {reason}; the package is damaged or was not made by trellis, and nothing was unpacked",
        dest.display()
    )]
    UnsafeEntry {
        dest: PathBuf,
        entry: String,
        reason: String,
    },

    /// The package stream is not a readable zstd-compressed tar stream.
    #[error(
        "cannot unpack into {}: the package cannot be read ({source}); it may be truncated or damaged, fetch it again",
        dest.display()
    )]
    InvalidPackage {
        dest: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Bytes offered as the stored form of a chunk are not one zstd frame
    /// of acceptable size. Nothing was stored.
    #[error(
        "the bytes received for chunk {digest} are not a valid stored chunk ({reason}); nothing was stored. The transfer was damaged: send or fetch it again"
    )]
    ChunkUnreadable { digest: Digest, reason: String },

    /// A stored chunk cannot be decompressed any more (disk damage, or
    /// someone edited the file).
    #[error(
        "chunk {digest} in {} is damaged ({reason}); delete it so that it is stored or fetched again",
        path.display()
    )]
    ChunkDamaged {
        digest: Digest,
        path: PathBuf,
        reason: String,
    },

    /// An artifact index is not one this version of trellis can read.
    #[error("artifact index {digest} cannot be read: {reason}")]
    InvalidIndex { digest: Digest, reason: String },

    /// The chunks of an artifact, put together, do not hash to the
    /// artifact's digest.
    #[error(
        "artifact {index}: its chunks put together hash to {actual}, not to {expected}; the artifact was not used. Push the build again"
    )]
    ArtifactMismatch {
        index: Digest,
        expected: Digest,
        actual: Digest,
    },

    /// `unpack` refuses to replace or merge into an existing directory.
    #[error(
        "cannot unpack into {}: it already exists; remove it first, or keep using it if it came from the same package",
        dest.display()
    )]
    DestinationExists { dest: PathBuf },
}

/// Result with [`CasError`] as the error.
pub type Result<T, E = CasError> = std::result::Result<T, E>;

impl CasError {
    /// Shorthand for the [`CasError::Io`] variant.
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        CasError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
