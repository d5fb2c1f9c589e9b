//! Packages: the directory of a `process:` component as one byte stream.
//!
//! A package is a tar stream compressed with zstd. [`pack_dir`] makes it
//! deterministic (sorted entries, no times, owners or stray mode bits), so
//! the same directory content always produces the same bytes and therefore
//! the same digest, wherever and whenever it is packed. [`unpack`] treats the
//! stream as untrusted: it refuses anything that could write outside the
//! destination and never leaves a partial result under the destination name.
//!
//! The compressed bytes are stable for a given zstd library version and
//! [`pack_dir`]'s settings. A change of either gives the same content a new
//! digest (one extra upload and download), never a wrong result, because
//! the unpacked files are the same.

mod pack;
mod rules;
mod unpack;

pub use pack::{PackSummary, pack_dir};
pub use unpack::unpack;
