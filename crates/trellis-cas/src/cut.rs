//! Cutting a stream into content-defined chunks without storing them, for
//! callers that decide per chunk what to do with it (a backup asks the hub
//! which chunks it lacks before compressing and sending those).

use std::io::{self, Read};

use crate::chunk::{CHUNK_AVG, CHUNK_MAX, CHUNK_MIN};
use crate::digest::Digest;

/// The bounds of content-defined chunking (FastCDC): smallest cut, the
/// size aimed for, largest cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkSizes {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

/// Artifacts' chunks ([`CHUNK_MIN`], [`CHUNK_AVG`], [`CHUNK_MAX`]).
pub const ARTIFACT_CHUNKS: ChunkSizes = ChunkSizes {
    min: CHUNK_MIN,
    avg: CHUNK_AVG,
    max: CHUNK_MAX,
};

/// Backups' chunks: an eighth of artifacts'. A write into a volume
/// changes the chunks it touches, so what a later backup moves is about
/// the bytes written plus the chunks cut on either side of them, about one
/// and a half average chunks per place written to: 1% of a 1 GiB volume
/// rewritten in 100 KiB writes moves about 2.3% of it with 64 KiB chunks,
/// and well under 2% with 32 KiB ones (BENCHMARKS.md, `backup`). More
/// chunks cost more digests in the manifest (66 bytes per 32 KiB, 0.2%)
/// and more files in the hub's store.
pub const BACKUP_CHUNKS: ChunkSizes = ChunkSizes {
    min: 8 * 1024,
    avg: 32 * 1024,
    max: 128 * 1024,
};

/// Cuts `content` into chunks and hands each, with its digest, to `each`,
/// in order; returns the number of bytes read. The first error of the
/// reader or of `each` ends it.
pub fn cut_chunks<E: From<io::Error>>(
    content: impl Read,
    sizes: ChunkSizes,
    mut each: impl FnMut(Digest, Vec<u8>) -> Result<(), E>,
) -> Result<u64, E> {
    let mut total = 0u64;
    for chunk in fastcdc::v2020::StreamCDC::new(content, sizes.min, sizes.avg, sizes.max) {
        let chunk = chunk.map_err(|e| match e {
            fastcdc::v2020::Error::IoError(e) => e,
            other => io::Error::other(other.to_string()),
        })?;
        total += chunk.data.len() as u64;
        each(Digest::of(&chunk.data), chunk.data)?;
    }
    Ok(total)
}

/// A chunk's stored form: one zstd frame of `data`, as the chunk stores
/// keep it and transfers carry it.
pub fn compress(data: &[u8]) -> io::Result<Vec<u8>> {
    zstd::bulk::compress(data, crate::chunk::ZSTD_LEVEL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_within_bounds_and_round_trips() {
        let mut state = 7u64;
        let data: Vec<u8> = (0..1_000_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let mut joined = Vec::new();
        let mut count = 0;
        let total = cut_chunks::<io::Error>(&data[..], BACKUP_CHUNKS, |digest, chunk| {
            assert_eq!(digest, Digest::of(&chunk));
            assert!(chunk.len() <= BACKUP_CHUNKS.max as usize);
            let stored = compress(&chunk)?;
            assert_eq!(
                crate::verify_stored(&digest, &stored).unwrap(),
                chunk.len() as u64
            );
            joined.extend_from_slice(&chunk);
            count += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(total, data.len() as u64);
        assert_eq!(joined, data);
        assert!(count > 5, "{count} chunks for 1 MB");
    }
}
