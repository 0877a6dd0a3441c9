//! The store conformance suite on every backend built in.

use std::sync::Arc;

use paychan::store::{MemoryStore, conformance};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_store_conforms() {
    conformance::run(Arc::new(MemoryStore::new()), 0x01).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_store_handles_share_state() {
    let store = MemoryStore::new();
    let handle = store.clone();
    conformance::run(Arc::new(handle), 0x02).await;
    // The clone saw every write: the first suite's channels are visible here.
    conformance::run(Arc::new(store), 0x03).await;
}
