//! Artifacts as content-defined chunks plus an index that lists them.
//!
//! An artifact (an image archive, a packed `process:` directory) is cut
//! into chunks where its *content* says so (FastCDC, see [`CHUNK_AVG`]), not
//! at fixed offsets: an edit in the middle of a large file changes the
//! chunks around the edit and leaves every other chunk — and its name —
//! as it was. Two builds that differ by a small change therefore share
//! almost all their chunks, and a transfer moves only the ones the other
//! side lacks.
//!
//! The [`ArtifactIndex`] lists the chunks in order with their sizes, and
//! the digest and size of the whole content. It is stored as a chunk too;
//! the digest of the index names the artifact.

use std::io::{self, Read};

use serde::{Deserialize, Serialize};

use crate::chunk::{CHUNK_AVG, CHUNK_MAX, CHUNK_MIN, ChunkStore};
use crate::digest::Digest;
use crate::error::{CasError, Result};

/// The `format` of the indexes this version writes and reads.
pub const INDEX_FORMAT: &str = "trellis-artifact/1";

/// What an artifact holds. Tells the agent what to do with the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArtifactKind {
    /// A container image archive (`docker save` format).
    Image,
    /// A packed `process:` directory (see [`crate::pack_dir`]).
    Package,
    /// A single executable stored as is: an agent binary the hub holds
    /// for installing and updating agents.
    Binary,
}

/// One chunk of an artifact: its digest and uncompressed size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkRef {
    pub digest: Digest,
    pub size: u64,
}

impl Serialize for ChunkRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        (self.digest.as_hex(), self.size).serialize(s)
    }
}

impl<'de> Deserialize<'de> for ChunkRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let (hex, size): (String, u64) = Deserialize::deserialize(d)?;
        let digest = hex.parse().map_err(serde::de::Error::custom)?;
        Ok(ChunkRef { digest, size })
    }
}

/// The list of an artifact's chunks. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactIndex {
    pub format: String,
    pub kind: ArtifactKind,
    /// Bytes of the whole (uncompressed) content.
    pub size: u64,
    /// Digest of the whole content.
    #[serde(with = "digest_hex")]
    pub digest: Digest,
    pub chunks: Vec<ChunkRef>,
}

mod digest_hex {
    use crate::digest::Digest;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Digest, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&d.as_hex())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl ArtifactIndex {
    /// Parses the content of the index chunk `digest`, checking that it
    /// is consistent (the chunk sizes add up to the artifact's size).
    pub fn parse(digest: &Digest, bytes: &[u8]) -> Result<ArtifactIndex> {
        let invalid = |reason: String| CasError::InvalidIndex {
            digest: *digest,
            reason,
        };
        let index: ArtifactIndex =
            serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        if index.format != INDEX_FORMAT {
            return Err(invalid(format!(
                "its format is {:?}; this version of trellis reads {INDEX_FORMAT:?} (upgrade trellis)",
                index.format
            )));
        }
        let total = index
            .chunks
            .iter()
            .try_fold(0u64, |sum, c| sum.checked_add(c.size));
        if total != Some(index.size) {
            return Err(invalid(format!(
                "its chunks do not add up to the artifact's {} bytes",
                index.size
            )));
        }
        Ok(index)
    }

    /// The index as stored (JSON).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an index always serializes")
    }

    /// The distinct chunks, in first-use order.
    pub fn distinct_chunks(&self) -> Vec<ChunkRef> {
        let mut seen = std::collections::HashSet::new();
        self.chunks
            .iter()
            .filter(|c| seen.insert(c.digest))
            .copied()
            .collect()
    }
}

/// What [`ChunkStore::put_artifact`] stored.
#[derive(Debug, Clone)]
pub struct PutArtifact {
    /// The artifact's name: the digest of its index.
    pub index_digest: Digest,
    pub index: ArtifactIndex,
    /// Stored bytes of the index and of all distinct chunks (what a
    /// transfer of the whole artifact moves).
    pub stored: u64,
}

impl ChunkStore {
    /// Cuts `content` into chunks, stores them and the index, and returns
    /// the artifact's name. Chunks already stored are not written again.
    pub fn put_artifact(&self, kind: ArtifactKind, content: impl Read) -> Result<PutArtifact> {
        let mut hashing = HashingReader {
            inner: content,
            hasher: blake3::Hasher::new(),
        };
        let mut chunks = Vec::new();
        let mut size = 0u64;
        let mut stored = 0u64;
        let mut seen = std::collections::HashSet::new();
        for chunk in fastcdc::v2020::StreamCDC::new(&mut hashing, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX) {
            let chunk = chunk.map_err(|e| match e {
                fastcdc::v2020::Error::IoError(e) => {
                    CasError::io("read the artifact's content for", self.root(), e)
                }
                other => CasError::io(
                    "chunk the artifact's content for",
                    self.root(),
                    io::Error::other(other.to_string()),
                ),
            })?;
            let info = self.insert(&chunk.data)?;
            if seen.insert(info.digest) {
                stored += info.stored;
            }
            size += info.size;
            chunks.push(ChunkRef {
                digest: info.digest,
                size: info.size,
            });
        }
        let index = ArtifactIndex {
            format: INDEX_FORMAT.to_owned(),
            kind,
            size,
            digest: Digest::from_hash(hashing.hasher.finalize()),
            chunks,
        };
        let info = self.insert(&index.to_bytes())?;
        Ok(PutArtifact {
            index_digest: info.digest,
            index,
            stored: stored + info.stored,
        })
    }

    /// Reads and parses the index of artifact `digest`.
    pub fn artifact(&self, digest: &Digest) -> Result<ArtifactIndex> {
        ArtifactIndex::parse(digest, &self.read(digest)?)
    }

    /// The distinct chunks of `index` that are not stored here.
    pub fn missing(&self, index: &ArtifactIndex) -> Vec<ChunkRef> {
        index
            .distinct_chunks()
            .into_iter()
            .filter(|c| !self.contains(&c.digest))
            .collect()
    }

    /// Reads the artifact's content back, verifying every chunk as it is
    /// read and the whole content at the end: a damaged or missing chunk,
    /// or content that does not hash to the index's digest, is a read
    /// error (kind `InvalidData`), never silently wrong bytes.
    pub fn open_artifact(&self, index_digest: &Digest, index: &ArtifactIndex) -> ArtifactReader {
        ArtifactReader {
            store: self.clone(),
            index_digest: *index_digest,
            expected: index.digest,
            chunks: index.chunks.clone().into_iter(),
            current: Vec::new(),
            pos: 0,
            hasher: blake3::Hasher::new(),
            done: false,
        }
    }
}

/// Reads an artifact's content from its chunks. See
/// [`ChunkStore::open_artifact`].
pub struct ArtifactReader {
    store: ChunkStore,
    index_digest: Digest,
    expected: Digest,
    chunks: std::vec::IntoIter<ChunkRef>,
    current: Vec<u8>,
    pos: usize,
    hasher: blake3::Hasher,
    done: bool,
}

impl Read for ArtifactReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            if self.done {
                return Ok(0);
            }
            match self.chunks.next() {
                Some(chunk) => {
                    let data = self
                        .store
                        .read(&chunk.digest)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    self.hasher.update(&data);
                    self.current = data;
                    self.pos = 0;
                }
                None => {
                    self.done = true;
                    let actual = Digest::from_hash(self.hasher.finalize());
                    if actual != self.expected {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            CasError::ArtifactMismatch {
                                index: self.index_digest,
                                expected: self.expected,
                                actual,
                            },
                        ));
                    }
                    return Ok(0);
                }
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

struct HashingReader<R> {
    inner: R,
    hasher: blake3::Hasher,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::Durability;

    /// Deterministic bytes that do not compress (xorshift).
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn store() -> (tempfile::TempDir, ChunkStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), Durability::Cache).unwrap();
        (dir, store)
    }

    #[test]
    fn round_trips_and_names_by_content() {
        let (_dir, store) = store();
        let content = noise(1, 3 * 1024 * 1024 + 17);
        let put = store
            .put_artifact(ArtifactKind::Package, &content[..])
            .unwrap();
        assert_eq!(put.index.size, content.len() as u64);
        assert_eq!(put.index.digest, Digest::of(&content));
        assert!(put.index.chunks.len() > 3, "{:?}", put.index.chunks.len());
        assert!(
            put.index
                .chunks
                .iter()
                .all(|c| c.size <= u64::from(CHUNK_MAX))
        );
        let index = store.artifact(&put.index_digest).unwrap();
        assert_eq!(index, put.index);
        let mut back = Vec::new();
        store
            .open_artifact(&put.index_digest, &index)
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, content);
        // The same content names the same artifact.
        let again = store
            .put_artifact(ArtifactKind::Package, &content[..])
            .unwrap();
        assert_eq!(again.index_digest, put.index_digest);
    }

    #[test]
    fn a_small_edit_changes_few_chunks() {
        let (_dir, store) = store();
        let mut content = noise(2, 8 * 1024 * 1024);
        let first = store
            .put_artifact(ArtifactKind::Image, &content[..])
            .unwrap();
        // Overwrite 1% in the middle, and insert a few bytes elsewhere.
        let mid = content.len() / 2;
        let edit = content.len() / 100;
        content[mid..mid + edit].copy_from_slice(&noise(3, edit));
        content.splice(1000..1000, *b"inserted");
        let before: std::collections::HashSet<_> =
            first.index.chunks.iter().map(|c| c.digest).collect();
        let second = store
            .put_artifact(ArtifactKind::Image, &content[..])
            .unwrap();
        let new_bytes: u64 = second
            .index
            .chunks
            .iter()
            .filter(|c| !before.contains(&c.digest))
            .map(|c| c.size)
            .sum();
        // The edit plus at most a few chunks around each change point.
        assert!(
            new_bytes < edit as u64 + 4 * u64::from(CHUNK_MAX),
            "{new_bytes} new bytes for a {edit}-byte edit"
        );
    }

    #[test]
    fn a_damaged_chunk_fails_the_read() {
        let (_dir, store) = store();
        let content = noise(4, 2 * 1024 * 1024);
        let put = store
            .put_artifact(ArtifactKind::Image, &content[..])
            .unwrap();
        let victim = put.index.chunks[1].digest;
        std::fs::write(
            store.path(&victim),
            zstd::bulk::compress(&noise(5, 1000), 3).unwrap(),
        )
        .unwrap();
        let mut back = Vec::new();
        let err = store
            .open_artifact(&put.index_digest, &put.index)
            .read_to_end(&mut back)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains(&victim.as_hex()), "{err}");
        assert_eq!(store.missing(&put.index), vec![]);
        store.remove(&victim).unwrap();
        assert_eq!(store.missing(&put.index).len(), 1);
    }

    #[test]
    fn refuses_inconsistent_indexes() {
        let d = Digest::of(b"index");
        let bad = br#"{"format":"trellis-artifact/1","kind":"image","size":10,"digest":"0000000000000000000000000000000000000000000000000000000000000000","chunks":[]}"#;
        assert!(ArtifactIndex::parse(&d, bad).is_err());
        let future = br#"{"format":"trellis-artifact/9","kind":"image","size":0,"digest":"0000000000000000000000000000000000000000000000000000000000000000","chunks":[]}"#;
        let err = ArtifactIndex::parse(&d, future).unwrap_err().to_string();
        assert!(err.contains("upgrade"), "{err}");
        assert!(ArtifactIndex::parse(&d, b"{").is_err());
    }
}
