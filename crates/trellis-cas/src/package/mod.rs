//! Packages: the directory of a `process:` component as one byte stream.
//!
//! A package is a tar stream. [`pack_dir`] makes it
//! deterministic (sorted entries, no times, owners or stray mode bits), so
//! the same directory content always produces the same bytes and therefore
//! the same digest, wherever and whenever it is packed. [`unpack`] treats the
//! stream as untrusted: it refuses anything that could write outside the
//! destination and never leaves a partial result under the destination name.
//!
//! The stream is stored as compressed content-defined chunks (see
//! [`crate::ChunkStore::put_artifact`]), not compressed as a whole, so a
//! change to one file costs only the chunks around it.

mod pack;
mod rules;
mod unpack;

pub use pack::{PackSummary, pack_dir};
pub use unpack::unpack;
