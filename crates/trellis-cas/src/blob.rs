//! A directory of blobs named by their digest.
//!
//! Layout under the store's root:
//!
//! ```text
//! <root>/blobs/<first two hex chars>/<64 hex chars>   stored blobs, read-only
//! <root>/tmp/                                         blobs being written
//! ```
//!
//! A blob is any byte string: today a whole packed artifact, later also the
//! chunks and chunk lists that content-defined chunking will produce. The
//! store does not care which; it only guarantees that the file named by a
//! digest, if present, was completely written and hashed to that digest when
//! it was stored. Writes go to a temporary file in `tmp/` (same filesystem,
//! so the final rename is atomic), which is hashed on the way in, synced, and
//! only then renamed to its digest name. The two-character fan-out keeps
//! directories small once the store holds many chunks.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use tempfile::NamedTempFile;

use crate::digest::Digest;
use crate::error::{CasError, Result};
use crate::fsutil::{self, COPY_BUF, CopyError};

/// What was stored: the blob's digest and length in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlobInfo {
    pub digest: Digest,
    pub size: u64,
}

/// A content-addressed blob store in a directory. Cheap to clone; clones
/// refer to the same directory. Several stores (or processes) may use the
/// same directory at once: writes of the same content race harmlessly, since
/// each rename puts identical, complete bytes under the name.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
    blobs: PathBuf,
    tmp: PathBuf,
}

impl BlobStore {
    /// Opens the store at `root`, creating `root/blobs` and `root/tmp` if
    /// they do not exist.
    pub fn open(root: &Path) -> Result<BlobStore> {
        let store = BlobStore {
            root: root.to_path_buf(),
            blobs: root.join("blobs"),
            tmp: root.join("tmp"),
        };
        for dir in [&store.blobs, &store.tmp] {
            fs::create_dir_all(dir)
                .map_err(|e| CasError::io("create the blob store directory", dir, e))?;
        }
        Ok(store)
    }

    /// The directory the store was opened at.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob `digest` is (or would be) stored. Reading the file
    /// directly is fine; writing to it is not (use [`BlobStore::writer`]).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        blob_path(&self.blobs, digest)
    }

    /// Starts writing a new blob. Write the content, then call
    /// [`BlobWriter::finish`]; dropping the writer instead discards it.
    pub fn writer(&self) -> Result<BlobWriter> {
        let temp = tempfile::Builder::new()
            .prefix("blob-")
            .suffix(".partial")
            .tempfile_in(&self.tmp)
            .map_err(|e| CasError::io("create a temporary file in", &self.tmp, e))?;
        Ok(BlobWriter {
            file: BufWriter::with_capacity(COPY_BUF, temp),
            hasher: blake3::Hasher::new(),
            size: 0,
            blobs: self.blobs.clone(),
        })
    }

    /// Stores `data`. Does nothing but hash it if it is already stored.
    pub fn put_bytes(&self, data: &[u8]) -> Result<BlobInfo> {
        let digest = Digest::of(data);
        let info = BlobInfo {
            digest,
            size: data.len() as u64,
        };
        if self.contains(&digest) {
            return Ok(info);
        }
        let mut writer = self.writer()?;
        if let Err(e) = writer.write_all(data) {
            return Err(CasError::io(
                "write the temporary blob file",
                writer.temp_path(),
                e,
            ));
        }
        // Passing the digest computed above makes `finish` double-check the
        // bytes that went through the writer.
        writer.finish(Some(&digest))
    }

    /// Stores the content of the file at `path`, streaming it.
    pub fn put_file(&self, path: &Path) -> Result<BlobInfo> {
        let mut source = File::open(path).map_err(|e| CasError::io("open", path, e))?;
        let mut writer = self.writer()?;
        match fsutil::copy(&mut source, &mut writer) {
            Ok(_) => writer.finish(None),
            Err(CopyError::Read(e)) => Err(CasError::io("read", path, e)),
            Err(CopyError::Write(e)) => Err(CasError::io(
                "write the temporary blob file",
                writer.temp_path(),
                e,
            )),
        }
    }

    /// Whether the blob is stored. Any error looking (permissions, say) is
    /// reported as "not stored"; the caller will then hit the real error when
    /// it tries to store or open the blob.
    pub fn contains(&self, digest: &Digest) -> bool {
        fs::symlink_metadata(self.path(digest)).is_ok_and(|m| m.is_file())
    }

    /// The size of the stored blob, or `None` if it is not stored.
    pub fn size(&self, digest: &Digest) -> Result<Option<u64>> {
        let path = self.path(digest);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CasError::io("look at blob", path, e)),
        }
    }

    /// Opens the stored blob for reading. ([`BlobStore::open`] is taken by
    /// the constructor, hence the name.)
    pub fn open_blob(&self, digest: &Digest) -> Result<File> {
        let path = self.path(digest);
        File::open(&path).map_err(|e| self.not_found_or_io(digest, "open blob", path, e))
    }

    /// Re-hashes the stored blob and fails with [`CasError::Corrupt`] if its
    /// content no longer matches its name.
    pub fn verify(&self, digest: &Digest) -> Result<()> {
        let mut file = self.open_blob(digest)?;
        let mut hasher = blake3::Hasher::new();
        hasher
            .update_reader(&mut file)
            .map_err(|e| CasError::io("read blob", self.path(digest), e))?;
        let actual = Digest::from_hash(hasher.finalize());
        if actual == *digest {
            Ok(())
        } else {
            Err(CasError::Corrupt {
                digest: *digest,
                actual,
                path: self.path(digest),
            })
        }
    }

    /// Removes the blob. Returns whether it was there.
    ///
    /// The directory is not synced afterwards: if a crash brings the blob
    /// back, it is still complete and correct (or `verify` catches it).
    pub fn remove(&self, digest: &Digest) -> Result<bool> {
        let path = self.path(digest);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(CasError::io("remove blob", path, e)),
        }
    }

    fn not_found_or_io(
        &self,
        digest: &Digest,
        action: &'static str,
        path: PathBuf,
        e: io::Error,
    ) -> CasError {
        if e.kind() == io::ErrorKind::NotFound {
            CasError::NotFound {
                digest: *digest,
                root: self.root.clone(),
            }
        } else {
            CasError::io(action, path, e)
        }
    }
}

fn shard_dir(blobs: &Path, digest: &Digest) -> PathBuf {
    let hex = digest.as_hex();
    blobs.join(&hex[..2])
}

fn blob_path(blobs: &Path, digest: &Digest) -> PathBuf {
    shard_dir(blobs, digest).join(digest.as_hex())
}

/// Writes one blob incrementally, hashing as it goes.
///
/// The bytes go to a temporary file that only [`BlobWriter::finish`] moves
/// into place; dropping the writer deletes the temporary file.
pub struct BlobWriter {
    file: BufWriter<NamedTempFile>,
    hasher: blake3::Hasher,
    size: u64,
    blobs: PathBuf,
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.size
    }

    /// Completes the blob and stores it under its digest.
    ///
    /// With `expected`, the content must hash to it; otherwise this fails
    /// with [`CasError::DigestMismatch`] and nothing is stored. The file is
    /// synced before it is renamed into place and the directory after, so a
    /// blob that `finish` reported as stored survives a crash, and a crash
    /// at any point never leaves a partial file under a digest name. If the
    /// blob was already stored, the new copy is discarded.
    pub fn finish(self, expected: Option<&Digest>) -> Result<BlobInfo> {
        let BlobWriter {
            file,
            hasher,
            size,
            blobs,
        } = self;
        let temp = file.into_inner().map_err(|e| {
            let (error, file) = e.into_parts();
            CasError::io(
                "write the temporary blob file",
                file.get_ref().path(),
                error,
            )
        })?;
        let digest = Digest::from_hash(hasher.finalize());
        if let Some(expected) = expected
            && *expected != digest
        {
            // `temp` is dropped on return, which deletes it.
            return Err(CasError::DigestMismatch {
                expected: *expected,
                actual: digest,
                size,
            });
        }
        let info = BlobInfo { digest, size };
        let dest = blob_path(&blobs, &digest);
        if fs::symlink_metadata(&dest).is_ok_and(|m| m.is_file()) {
            return Ok(info);
        }

        // Stored blobs are never modified in place; making them read-only
        // turns an accidental write into an error instead of corruption.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            temp.as_file()
                .set_permissions(fs::Permissions::from_mode(0o444))
                .map_err(|e| CasError::io("set permissions of", temp.path(), e))?;
        }
        temp.as_file()
            .sync_all()
            .map_err(|e| CasError::io("sync the temporary blob file", temp.path(), e))?;

        let shard = shard_dir(&blobs, &digest);
        match fs::create_dir(&shard) {
            // A new directory entry in `blobs/` must be durable too, or the
            // blob could vanish with it after a crash.
            Ok(()) => fsutil::sync_dir(&blobs)
                .map_err(|e| CasError::io("sync the directory", &blobs, e))?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(CasError::io("create the directory", shard, e)),
        }
        // If another writer stored the same content meanwhile, this rename
        // replaces its file with identical bytes, which readers cannot tell.
        temp.persist(&dest)
            .map_err(|e| CasError::io("move the finished blob into place at", &dest, e.error))?;
        fsutil::sync_dir(&shard).map_err(|e| CasError::io("sync the directory", &shard, e))?;
        Ok(info)
    }

    fn temp_path(&self) -> &Path {
        self.file.get_ref().path()
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        // Hash only what was accepted: the caller will retry the rest.
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl fmt::Debug for BlobWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobWriter")
            .field("temp", &self.temp_path())
            .field("written", &self.size)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, BlobStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        (dir, store)
    }

    fn tmp_entries(store: &BlobStore) -> usize {
        fs::read_dir(store.root().join("tmp")).unwrap().count()
    }

    #[test]
    fn layout_is_fanned_out_by_first_two_hex_chars() {
        let (dir, store) = store();
        let d = Digest::of(b"layout");
        let hex = d.as_hex();
        assert_eq!(
            store.path(&d),
            dir.path().join("blobs").join(&hex[..2]).join(&hex)
        );
    }

    #[test]
    fn incremental_writes_hash_the_whole_content() {
        let (_dir, store) = store();
        let mut w = store.writer().unwrap();
        w.write_all(b"hello ").unwrap();
        w.write_all(b"world").unwrap();
        assert_eq!(w.written(), 11);
        let info = w.finish(None).unwrap();
        assert_eq!(info.digest, Digest::of(b"hello world"));
        assert_eq!(info.size, 11);
        assert_eq!(fs::read(store.path(&info.digest)).unwrap(), b"hello world");
        assert_eq!(tmp_entries(&store), 0);
    }

    #[test]
    fn storing_twice_keeps_one_copy_and_no_temp() {
        let (_dir, store) = store();
        let a = store.put_bytes(b"same").unwrap();
        let mut w = store.writer().unwrap();
        w.write_all(b"same").unwrap();
        let b = w.finish(Some(&a.digest)).unwrap();
        assert_eq!(a, b);
        assert_eq!(tmp_entries(&store), 0);
    }

    #[cfg(unix)]
    #[test]
    fn stored_blobs_are_read_only() {
        use std::os::unix::fs::PermissionsExt;
        let (_dir, store) = store();
        let info = store.put_bytes(b"ro").unwrap();
        let mode = fs::metadata(store.path(&info.digest))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o444);
        // Read-only files can still be removed: removal is a directory write.
        assert!(store.remove(&info.digest).unwrap());
        assert!(!store.remove(&info.digest).unwrap());
    }
}
