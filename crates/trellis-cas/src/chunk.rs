//! A directory of compressed chunks named by the digest of their content.
//!
//! Layout under the store's root:
//!
//! ```text
//! <root>/chunks/<first two hex chars>/<64 hex chars>   zstd frames, read-only
//! <root>/tmp/                                          chunks being written
//! ```
//!
//! A chunk file holds one zstd frame; the file's name is the BLAKE3 digest
//! of the *uncompressed* bytes. The compressed form is what travels (hub to
//! agent, CLI to hub) and what is stored, so a transfer costs the compressed
//! size, and anyone holding the bytes can check them against the name by
//! decompressing and hashing ([`ChunkStore::verify_stored`]).
//!
//! Every read decompresses and verifies, so a chunk damaged on disk is
//! reported, never used. Writes go through a temporary file renamed into
//! place, so a name never points at half a chunk. Whether each chunk is also
//! synced to disk is the store's [`Durability`]: the hub (the source of
//! truth) syncs; an agent's cache does not need to, because whatever a crash
//! leaves damaged fails verification and is fetched again.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::digest::Digest;
use crate::error::{CasError, Result};
use crate::fsutil;

/// Smallest chunk content-defined chunking cuts (except an artifact's last).
pub const CHUNK_MIN: u32 = 64 * 1024;
/// The chunk size content-defined chunking aims for.
pub const CHUNK_AVG: u32 = 256 * 1024;
/// Largest chunk content-defined chunking cuts.
pub const CHUNK_MAX: u32 = 1024 * 1024;

/// The largest uncompressed chunk the store accepts. Data chunks are at most
/// [`CHUNK_MAX`]; artifact indexes of very large artifacts can be bigger.
/// The bound keeps a hostile compressed chunk (a "zip bomb") from filling
/// memory when it is verified.
pub const MAX_CHUNK_BYTES: u64 = 64 * 1024 * 1024;

/// zstd level for chunks: zstd's default, fast to compress on a build
/// machine, and decompression speed does not depend on it.
pub(crate) const ZSTD_LEVEL: i32 = 3;

/// Whether every stored chunk is synced to disk before it becomes visible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Sync each chunk and its directory entry (the hub's store).
    Synced,
    /// Rename without syncing (a cache whose damage is caught on read).
    Cache,
}

/// What was stored: the chunk's digest, its uncompressed size, and the size
/// of its stored (compressed) form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkInfo {
    pub digest: Digest,
    pub size: u64,
    pub stored: u64,
}

/// One stored chunk as listed by [`ChunkStore::list`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredChunk {
    pub digest: Digest,
    /// Bytes on disk (compressed).
    pub stored: u64,
    /// When it was stored or last marked as wanted ([`ChunkStore::touch`]).
    pub modified: SystemTime,
}

/// A content-addressed store of compressed chunks. Cheap to clone; clones
/// refer to the same directory, and several processes may share it.
#[derive(Debug, Clone)]
pub struct ChunkStore {
    root: PathBuf,
    chunks: PathBuf,
    tmp: PathBuf,
    durability: Durability,
}

impl ChunkStore {
    /// Opens the store at `root`, creating `root/chunks` and `root/tmp`.
    pub fn open(root: &Path, durability: Durability) -> Result<ChunkStore> {
        let store = ChunkStore {
            root: root.to_path_buf(),
            chunks: root.join("chunks"),
            tmp: root.join("tmp"),
            durability,
        };
        for dir in [&store.chunks, &store.tmp] {
            fs::create_dir_all(dir)
                .map_err(|e| CasError::io("create the chunk store directory", dir, e))?;
        }
        Ok(store)
    }

    /// The directory the store was opened at.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the stored (compressed) form of `digest` is or would be.
    /// Reading it directly is fine (it is what travels); writing is not.
    pub fn path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.as_hex();
        self.chunks.join(&hex[..2]).join(hex)
    }

    /// Whether the chunk is stored (not whether it is intact).
    pub fn contains(&self, digest: &Digest) -> bool {
        fs::symlink_metadata(self.path(digest)).is_ok_and(|m| m.is_file())
    }

    /// The size of the stored form, or `None` if the chunk is not stored.
    pub fn stored_size(&self, digest: &Digest) -> Result<Option<u64>> {
        let path = self.path(digest);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CasError::io("look at chunk", path, e)),
        }
    }

    /// Compresses and stores `data`. Stores nothing new if a chunk with
    /// the same content is already there.
    pub fn insert(&self, data: &[u8]) -> Result<ChunkInfo> {
        let digest = Digest::of(data);
        if let Some(stored) = self.stored_size(&digest)? {
            return Ok(ChunkInfo {
                digest,
                size: data.len() as u64,
                stored,
            });
        }
        let compressed = zstd::bulk::compress(data, ZSTD_LEVEL)
            .map_err(|e| CasError::io("compress a chunk for", self.path(&digest), e))?;
        self.write(&digest, &compressed)?;
        Ok(ChunkInfo {
            digest,
            size: data.len() as u64,
            stored: compressed.len() as u64,
        })
    }

    /// Stores a chunk received in its stored form, after checking that it
    /// decompresses to content named `digest`. Nothing is stored otherwise.
    pub fn insert_stored(&self, digest: &Digest, stored: &[u8]) -> Result<ChunkInfo> {
        let size = verify_stored(digest, stored)?;
        if !self.contains(digest) {
            self.write(digest, stored)?;
        }
        Ok(ChunkInfo {
            digest: *digest,
            size,
            stored: stored.len() as u64,
        })
    }

    /// Moves `file` into the store as chunk `digest`, once `stored` — the
    /// file's content, held in memory by the caller who wrote it — is
    /// verified. Saves writing the bytes a second time. A `stored` that
    /// does not verify removes the file and returns the error.
    pub fn adopt_written(&self, digest: &Digest, file: &Path, stored: &[u8]) -> Result<ChunkInfo> {
        let size = match verify_stored(digest, stored) {
            Ok(size) => size,
            Err(e) => {
                let _ = fs::remove_file(file);
                return Err(e);
            }
        };
        let dest = self.path(digest);
        let parent = dest.parent().expect("chunk paths have a parent");
        fs::create_dir_all(parent).map_err(|e| CasError::io("create", parent, e))?;
        if self.durability == Durability::Synced {
            File::open(file)
                .and_then(|f| f.sync_all())
                .map_err(|e| CasError::io("sync", file, e))?;
        }
        fs::rename(file, &dest).map_err(|e| CasError::io("move a chunk into", &dest, e))?;
        Ok(ChunkInfo {
            digest: *digest,
            size,
            stored: stored.len() as u64,
        })
    }

    /// Reads, decompresses and verifies the chunk.
    pub fn read(&self, digest: &Digest) -> Result<Vec<u8>> {
        let path = self.path(digest);
        let stored = fs::read(&path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                CasError::NotFound {
                    digest: *digest,
                    root: self.root.clone(),
                }
            } else {
                CasError::io("read chunk", &path, e)
            }
        })?;
        let data = decompress(&stored).map_err(|e| corrupt_at(digest, &path, e))?;
        let actual = Digest::of(&data);
        if actual != *digest {
            return Err(CasError::Corrupt {
                digest: *digest,
                actual,
                path,
            });
        }
        Ok(data)
    }

    /// Re-reads the chunk and fails with [`CasError::Corrupt`] unless it
    /// decompresses to content named by its digest.
    pub fn verify(&self, digest: &Digest) -> Result<()> {
        self.read(digest).map(|_| ())
    }

    /// Marks the chunk as wanted now (its modification time), which keeps
    /// it through garbage collection's grace period. Returns whether the
    /// chunk is stored.
    pub fn touch(&self, digest: &Digest) -> bool {
        let path = self.path(digest);
        match File::options().append(true).open(&path) {
            Ok(file) => file.set_modified(SystemTime::now()).is_ok(),
            Err(_) => false,
        }
    }

    /// Removes the chunk. Returns whether it was there.
    pub fn remove(&self, digest: &Digest) -> Result<bool> {
        let path = self.path(digest);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(CasError::io("remove chunk", path, e)),
        }
    }

    /// Every stored chunk. Files that are not named like chunks are skipped.
    pub fn list(&self) -> Result<Vec<StoredChunk>> {
        let mut chunks = Vec::new();
        let fanout = match fs::read_dir(&self.chunks) {
            Ok(dir) => dir,
            Err(e) => return Err(CasError::io("list", &self.chunks, e)),
        };
        for dir in fanout.flatten() {
            let Ok(entries) = fs::read_dir(dir.path()) else {
                continue;
            };
            for entry in entries.flatten() {
                let Some(digest) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<Digest>().ok())
                else {
                    continue;
                };
                let Ok(meta) = entry.metadata() else { continue };
                if !meta.is_file() {
                    continue;
                }
                chunks.push(StoredChunk {
                    digest,
                    stored: meta.len(),
                    modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                });
            }
        }
        Ok(chunks)
    }

    /// Where downloads and uploads in progress may keep their files: on the
    /// store's filesystem, so [`ChunkStore::adopt_written`] renames atomically.
    pub fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    fn write(&self, digest: &Digest, stored: &[u8]) -> Result<()> {
        let dest = self.path(digest);
        let parent = dest.parent().expect("chunk paths have a parent");
        fs::create_dir_all(parent).map_err(|e| CasError::io("create", parent, e))?;
        let mut temp = tempfile::Builder::new()
            .prefix("chunk-")
            .suffix(".partial")
            .tempfile_in(&self.tmp)
            .map_err(|e| CasError::io("create a temporary file in", &self.tmp, e))?;
        temp.write_all(stored)
            .map_err(|e| CasError::io("write the temporary chunk file", temp.path(), e))?;
        if self.durability == Durability::Synced {
            temp.as_file()
                .sync_all()
                .map_err(|e| CasError::io("sync the temporary chunk file", temp.path(), e))?;
        }
        temp.persist(&dest)
            .map_err(|e| CasError::io("move a chunk into", &dest, e.error))?;
        if self.durability == Durability::Synced {
            fsutil::sync_dir(parent).map_err(|e| CasError::io("sync", parent, e))?;
        }
        Ok(())
    }
}

/// Decompresses a stored chunk, refusing content over [`MAX_CHUNK_BYTES`].
pub fn decompress(stored: &[u8]) -> io::Result<Vec<u8>> {
    let mut decoder = zstd::stream::read::Decoder::with_buffer(stored)?;
    let mut data = Vec::new();
    (&mut decoder)
        .take(MAX_CHUNK_BYTES + 1)
        .read_to_end(&mut data)?;
    if data.len() as u64 > MAX_CHUNK_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("it decompresses to more than {MAX_CHUNK_BYTES} bytes"),
        ));
    }
    // Trailing bytes after the frame would let two different files carry
    // the same name.
    let mut rest = [0u8; 1];
    if decoder.finish().read(&mut rest)? != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "it has bytes after its compressed frame",
        ));
    }
    Ok(data)
}

/// Checks that `stored` decompresses to content named `digest`; returns the
/// content's size. Streams the content through the hash in small pieces
/// instead of holding it, since every delivered chunk passes here.
pub fn verify_stored(digest: &Digest, stored: &[u8]) -> Result<u64> {
    let unreadable = |e: io::Error| CasError::ChunkUnreadable {
        digest: *digest,
        reason: e.to_string(),
    };
    let mut decoder = zstd::stream::read::Decoder::with_buffer(stored).map_err(unreadable)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = [0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = match decoder.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(unreadable(e)),
        };
        size += n as u64;
        if size > MAX_CHUNK_BYTES {
            return Err(unreadable(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("it decompresses to more than {MAX_CHUNK_BYTES} bytes"),
            )));
        }
        hasher.update(&buf[..n]);
    }
    let mut rest = [0u8; 1];
    if decoder.finish().read(&mut rest).map_err(unreadable)? != 0 {
        return Err(unreadable(io::Error::new(
            io::ErrorKind::InvalidData,
            "it has bytes after its compressed frame",
        )));
    }
    let actual = Digest::from_hash(hasher.finalize());
    if actual != *digest {
        return Err(CasError::DigestMismatch {
            expected: *digest,
            actual,
            size,
        });
    }
    Ok(size)
}

fn corrupt_at(digest: &Digest, path: &Path, e: io::Error) -> CasError {
    CasError::ChunkDamaged {
        digest: *digest,
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(durability: Durability) -> (tempfile::TempDir, ChunkStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path(), durability).unwrap();
        (dir, store)
    }

    #[test]
    fn stores_compressed_and_reads_back_verified() {
        let (_dir, store) = store(Durability::Synced);
        let data = b"hello hello hello hello hello hello hello hello".repeat(100);
        let info = store.insert(&data).unwrap();
        assert_eq!(info.digest, Digest::of(&data));
        assert_eq!(info.size, data.len() as u64);
        assert!(info.stored < info.size, "text compresses");
        assert_eq!(store.read(&info.digest).unwrap(), data);
        assert_eq!(store.stored_size(&info.digest).unwrap(), Some(info.stored));
        assert_eq!(store.list().unwrap().len(), 1);
        // The same content again stores nothing new.
        assert_eq!(store.insert(&data).unwrap(), info);
    }

    #[test]
    fn refuses_stored_forms_that_do_not_match_their_name() {
        let (_dir, store) = store(Durability::Cache);
        let good = zstd::bulk::compress(b"right", 3).unwrap();
        let named = Digest::of(b"right");
        let wrong = Digest::of(b"wrong");
        assert!(matches!(
            store.insert_stored(&wrong, &good),
            Err(CasError::DigestMismatch { .. })
        ));
        assert!(!store.contains(&wrong));
        assert!(matches!(
            store.insert_stored(&named, b"not zstd at all"),
            Err(CasError::ChunkUnreadable { .. })
        ));
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(store.insert_stored(&named, &trailing).is_err());
        assert!(store.list().unwrap().is_empty());
        store.insert_stored(&named, &good).unwrap();
        assert_eq!(store.read(&named).unwrap(), b"right");
    }

    #[test]
    fn reports_damaged_chunks_instead_of_returning_them() {
        let (_dir, store) = store(Durability::Cache);
        let info = store.insert(&[7u8; 10_000]).unwrap();
        let path = store.path(&info.digest);
        let other = zstd::bulk::compress(&[8u8; 10_000], 3).unwrap();
        fs::write(&path, other).unwrap();
        assert!(matches!(
            store.read(&info.digest),
            Err(CasError::Corrupt { .. })
        ));
        fs::write(&path, b"garbage").unwrap();
        assert!(matches!(
            store.read(&info.digest),
            Err(CasError::ChunkDamaged { .. })
        ));
    }

    #[test]
    fn refuses_chunks_that_decompress_beyond_the_limit() {
        let huge = vec![0u8; (MAX_CHUNK_BYTES + 1) as usize];
        let bomb = zstd::bulk::compress(&huge, 3).unwrap();
        assert!(bomb.len() < 100_000);
        assert!(verify_stored(&Digest::of(&huge), &bomb).is_err());
    }

    #[test]
    fn adopts_only_verified_downloads() {
        let (_dir, store) = store(Durability::Cache);
        let file = store.tmp_dir().join("download");
        let stored = zstd::bulk::compress(b"payload", 3).unwrap();
        fs::write(&file, &stored).unwrap();
        assert!(
            store
                .adopt_written(&Digest::of(b"other"), &file, &stored)
                .is_err()
        );
        assert!(!file.exists(), "a download that does not verify is dropped");
        fs::write(&file, &stored).unwrap();
        let info = store
            .adopt_written(&Digest::of(b"payload"), &file, &stored)
            .unwrap();
        assert_eq!(store.read(&info.digest).unwrap(), b"payload");
    }
}
