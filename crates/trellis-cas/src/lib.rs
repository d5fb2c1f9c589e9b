//! Content-addressed artifact storage for Trellis.
//!
//! The hub stores build artifacts here and agents fetch them into their own
//! store; both sides name every artifact by the BLAKE3 digest of its bytes,
//! so a transfer can be checked, deduplicated and resumed by name alone.
//!
//! - [`Digest`]: the name of a piece of content.
//! - [`BlobStore`]: a directory of blobs named by digest, written
//!   atomically and durably through a [`BlobWriter`].
//! - [`pack_dir`] / [`unpack`]: turn the directory of a `process:` component
//!   into one deterministic, zstd-compressed tar stream (a package) and
//!   back, refusing anything that could escape the destination.
//!
//! A package is stored as one blob today. Content-defined chunking will
//! later split large blobs into chunk blobs plus a list of their digests;
//! those are blobs too, so the store and its layout stay as they are.
//!
//! ```
//! # fn main() -> Result<(), trellis_cas::CasError> {
//! # let tmp = tempfile::tempdir().unwrap();
//! # let build = tmp.path().join("build");
//! # std::fs::create_dir(&build).unwrap();
//! # std::fs::write(build.join("app"), b"#!/bin/sh\n").unwrap();
//! use trellis_cas::{BlobStore, pack_dir, unpack};
//!
//! let store = BlobStore::open(&tmp.path().join("store"))?;
//! let mut writer = store.writer()?;
//! pack_dir(&build, &mut writer)?;
//! let package = writer.finish(None)?;
//!
//! store.verify(&package.digest)?;
//! unpack(store.open_blob(&package.digest)?, &tmp.path().join("run"))?;
//! # assert!(tmp.path().join("run/app").is_file());
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - `digest.rs`: [`Digest`].
//! - `error.rs`: [`CasError`], the crate's only error type.
//! - `blob.rs`: [`BlobStore`], [`BlobWriter`], [`BlobInfo`].
//! - `package/`: packing (`pack.rs`), unpacking (`unpack.rs`) and the path
//!   rules both sides enforce (`rules.rs`).
//! - `fsutil.rs`: directory syncing and copying helpers.

mod blob;
mod digest;
mod error;
mod fsutil;
mod package;

pub use blob::{BlobInfo, BlobStore, BlobWriter};
pub use digest::Digest;
pub use error::{CasError, Result};
pub use package::{PackSummary, pack_dir, unpack};
