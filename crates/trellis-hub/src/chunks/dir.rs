//! Chunks in a directory of the hub's data directory (`artifacts/`): the
//! default. The files are [`ChunkStore`]'s (`chunks/<2 hex>/<digest>`),
//! each synced before it becomes visible; "wanted" is the file's
//! modification time.

use std::path::Path;

use async_trait::async_trait;
use bytes::Bytes;
use trellis_cas::{CasError, ChunkStore, Digest, Durability, StoredChunk};

use super::{ChunkBackend, ChunkError};

/// The directory backend.
pub struct DirChunks {
    store: ChunkStore,
    describe: String,
}

impl DirChunks {
    /// Opens (creating) the store at `root`.
    pub fn open(root: &Path) -> anyhow::Result<DirChunks> {
        let store = ChunkStore::open(root, Durability::Synced)
            .map_err(|e| anyhow::anyhow!("opening the artifact store {}: {e}", root.display()))?;
        Ok(DirChunks {
            describe: format!("the artifact directory {}", root.display()),
            store,
        })
    }

    fn error(&self, e: CasError) -> ChunkError {
        match e {
            CasError::NotFound { digest, .. } => ChunkError::NotFound {
                store: self.describe.clone(),
                digest,
            },
            CasError::Io { ref source, .. } => ChunkError::Failed {
                store: self.describe.clone(),
                disk_full: trellis_cas::is_disk_full(source),
                reason: e.to_string(),
            },
            other => ChunkError::Failed {
                store: self.describe.clone(),
                reason: other.to_string(),
                disk_full: false,
            },
        }
    }

    /// Runs `f` on the store on a blocking thread.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ChunkStore) -> Result<T, CasError> + Send + 'static,
    ) -> Result<T, ChunkError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| ChunkError::Failed {
                store: self.describe.clone(),
                reason: format!("the file operation stopped: {e}"),
                disk_full: false,
            })?
            .map_err(|e| self.error(e))
    }
}

#[async_trait]
impl ChunkBackend for DirChunks {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    async fn check(&self) -> Result<(), ChunkError> {
        // Writable: a file in its own directory, written and removed.
        self.blocking(|store| {
            let probe = store
                .tmp_dir()
                .join(format!(".write-check-{}", std::process::id()));
            std::fs::write(&probe, b"")
                .and_then(|()| std::fs::remove_file(&probe))
                .map_err(|e| CasError::io("write a file in", store.tmp_dir(), e))
        })
        .await
    }

    async fn get(&self, digest: &Digest) -> Result<Option<Bytes>, ChunkError> {
        let path = self.store.path(digest);
        match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(Some(Bytes::from(bytes))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.error(CasError::io("read chunk", &path, e))),
        }
    }

    async fn put(&self, digest: &Digest, stored: Bytes) -> Result<(), ChunkError> {
        let d = *digest;
        self.blocking(move |store| store.insert_stored(&d, &stored).map(|_| ()))
            .await
    }

    async fn contains(&self, digest: &Digest) -> Result<bool, ChunkError> {
        let d = *digest;
        self.blocking(move |store| Ok(store.contains(&d))).await
    }

    async fn touch(&self, digest: &Digest) -> Result<bool, ChunkError> {
        let d = *digest;
        self.blocking(move |store| Ok(store.touch(&d))).await
    }

    async fn list(&self) -> Result<Vec<StoredChunk>, ChunkError> {
        self.blocking(|store| store.list()).await
    }

    async fn remove(&self, digest: &Digest) -> Result<bool, ChunkError> {
        let d = *digest;
        self.blocking(move |store| store.remove(&d)).await
    }

    fn local(&self) -> Option<&ChunkStore> {
        Some(&self.store)
    }
}
