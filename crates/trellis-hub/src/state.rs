//! The state every request handler shares.

use std::sync::Arc;

use trellis_cas::BlobStore;
use trellis_store::Store;

use crate::auth::KeyVerifier;

/// Cheap to clone: one `Arc` around everything.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

struct Inner {
    store: Arc<dyn Store>,
    blobs: BlobStore,
    keys: KeyVerifier,
}

impl AppState {
    pub fn new(store: Arc<dyn Store>, blobs: BlobStore) -> Self {
        AppState(Arc::new(Inner {
            store,
            blobs,
            keys: KeyVerifier::default(),
        }))
    }

    pub fn store(&self) -> &dyn Store {
        self.0.store.as_ref()
    }

    pub fn blobs(&self) -> &BlobStore {
        &self.0.blobs
    }

    pub fn keys(&self) -> &KeyVerifier {
        &self.0.keys
    }
}
