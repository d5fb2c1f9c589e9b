//! Content-addressed artifact storage for Trellis.
//!
//! The hub stores build artifacts here and agents fetch them into their own
//! store; both sides name every artifact by the BLAKE3 digest of its bytes,
//! so a transfer can be checked, deduplicated and resumed by name alone.
//!
//! - [`Digest`]: the name of a piece of content.
//! - [`ChunkStore`]: compressed chunks named by the digest of their
//!   content; every read is verified.
//! - [`ChunkStore::put_artifact`] / [`ChunkStore::open_artifact`]: an
//!   artifact (image archive, package) cut into content-defined chunks
//!   plus an [`ArtifactIndex`] listing them, and read back verified. A small
//!   change to a large artifact changes few chunks, so transfers move only
//!   what the other side lacks.
//! - [`pack_dir`] / [`unpack`]: turn the directory of a `process:` component
//!   into one deterministic tar stream (a package) and back, refusing
//!   anything that could escape the destination.
//!
//! ```
//! # fn main() -> Result<(), trellis_cas::CasError> {
//! # let tmp = tempfile::tempdir().unwrap();
//! # let build = tmp.path().join("build");
//! # std::fs::create_dir(&build).unwrap();
//! # std::fs::write(build.join("app"), b"#!/bin/sh\n").unwrap();
//! use trellis_cas::{ArtifactKind, ChunkStore, Durability, pack_dir, unpack};
//!
//! let store = ChunkStore::open(&tmp.path().join("store"), Durability::Synced)?;
//! let mut package = Vec::new();
//! pack_dir(&build, &mut package)?;
//! let put = store.put_artifact(ArtifactKind::Package, &package[..])?;
//!
//! let index = store.artifact(&put.index_digest)?;
//! unpack(store.open_artifact(&put.index_digest, &index), &tmp.path().join("run"))?;
//! # assert!(tmp.path().join("run/app").is_file());
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - `digest.rs`: [`Digest`].
//! - `error.rs`: [`CasError`], the crate's only error type.
//! - `chunk.rs`: [`ChunkStore`] and the chunk size bounds.
//! - `backup.rs`: [`BackupManifest`], what a backup of a stage's volumes lists.
//! - `cut.rs`: [`cut_chunks`], chunking a stream without storing it (backups).
//! - `artifact.rs`: [`ArtifactIndex`], chunking and reading artifacts.
//! - `package/`: packing (`pack.rs`), unpacking (`unpack.rs`) and the path
//!   rules both sides enforce (`rules.rs`).
//! - `fsutil.rs`: directory syncing and copying helpers.

mod artifact;
mod backup;
mod chunk;
mod cut;
mod digest;
mod error;
mod fsutil;
mod package;

pub use artifact::{
    ArtifactIndex, ArtifactKind, ArtifactReader, ChunkRef, INDEX_FORMAT, PutArtifact,
};
pub use backup::{BACKUP_FORMAT, BackupEntry, BackupManifest, BackupVolume, EntryKind};
pub use chunk::{
    CHUNK_AVG, CHUNK_MAX, CHUNK_MIN, ChunkInfo, ChunkStore, Durability, MAX_CHUNK_BYTES,
    StoredChunk, decompress, verify_stored,
};
pub use cut::{ARTIFACT_CHUNKS, BACKUP_CHUNKS, ChunkSizes, compress, cut_chunks};
pub use digest::Digest;
pub use error::{CasError, Result};
pub use fsutil::is_disk_full;
pub use package::{PackSummary, pack_dir, unpack};
