//! The store conformance suite on every backend built in.

use std::sync::Arc;

mod common;

#[allow(unused_imports)]
use common::stores::*;
use paychan::channel::ChannelState;
use paychan::store::{ChannelRecord, ChannelStore, Leased, MemoryStore, conformance};

/// The conformance suite ([`conformance::run`]: its model-based check included), on every
/// backend.
async fn conforms<S: ChannelStore>(store: S) {
    conformance::run(Arc::new(store), 0x01).await;
}
for_each_store!(store_conforms, conforms);

/// The model-based check through a [`Leased`] node ([`conformance::run_leased`]), on every
/// backend.
async fn conforms_leased<S: ChannelStore>(store: S) {
    conformance::run_leased(&Leased::new(store), 0x05).await;
}
for_each_store!(leased_node_conforms, conforms_leased);

/// Asserts that `store` (reopened, or another connection) holds exactly what `memory` holds
/// after the same operations, and that its key index counter continued: a server key is never
/// reused.
#[allow(dead_code)]
async fn assert_same_state<S: ChannelStore>(memory: &MemoryStore, store: &S) {
    for state in [ChannelState::Open, ChannelState::Closing, ChannelState::Failed] {
        let mut expected = memory.list(state).await.unwrap();
        let mut found = store.list(state).await.unwrap();
        expected.sort_by_key(ChannelRecord::id);
        found.sort_by_key(ChannelRecord::id);
        assert!(!found.is_empty(), "the suite leaves {state:?} channels behind");
        assert_eq!(found, expected, "{state:?} channels");
    }
    assert_eq!(store.next_key_index().await.unwrap(), memory.next_key_index().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_store_handles_share_state() {
    let store = MemoryStore::new();
    let handle = store.clone();
    conformance::run(Arc::new(handle), 0x02).await;
    // The clone saw every write: the first suite's channels are visible here.
    conformance::run(Arc::new(store), 0x03).await;
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_keeps_everything_across_a_reopen() {
    use paychan::store::SqliteStore;
    let path = temp_db("reopen");
    let memory = MemoryStore::with_first_key_index(0);
    {
        let store = Arc::new(SqliteStore::open(&path).unwrap());
        // Same operations on both stores: the SQLite one must read back what memory holds.
        conformance::run(store.clone(), 0x07).await;
        conformance::run(Arc::new(memory.clone()), 0x07).await;
        assert_eq!(store.next_key_index().await.unwrap(), memory.next_key_index().await.unwrap());
    }
    let reopened = SqliteStore::open(&path).unwrap();
    assert_same_state(&memory, &reopened).await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_keeps_everything_across_a_reconnect() {
    use paychan::store::PostgresStore;
    let Some(config) = postgres_config("reconnect").await else { return };
    let memory = MemoryStore::with_first_key_index(0);
    {
        let store = Arc::new(PostgresStore::connect_with(config.clone()).await.unwrap());
        conformance::run(store.clone(), 0x07).await;
        conformance::run(Arc::new(memory.clone()), 0x07).await;
        assert_eq!(store.next_key_index().await.unwrap(), memory.next_key_index().await.unwrap());
    }
    let reconnected = PostgresStore::connect_with(config).await.unwrap();
    assert_same_state(&memory, &reconnected).await;
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_store_unreachable_is_unavailable() {
    // Port 9 (discard) on loopback: nothing listens there.
    let error = paychan::store::PostgresStore::connect("postgres://postgres@127.0.0.1:9/test")
        .await
        .expect_err("nothing listens on port 9");
    assert!(matches!(error, paychan::store::StoreError::Unavailable { .. }), "{error:?}");
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_keeps_everything_across_a_reconnect() {
    let Some(store) = redis_store("reconnect").await else { return };
    let memory = MemoryStore::with_first_key_index(0);
    let store = Arc::new(store);
    conformance::run(store.clone(), 0x07).await;
    conformance::run(Arc::new(memory.clone()), 0x07).await;
    assert_eq!(store.next_key_index().await.unwrap(), memory.next_key_index().await.unwrap());
    // A new connection (another node) sees the same state.
    let url = std::env::var("PAYCHAN_TEST_REDIS_URL").unwrap();
    let other =
        paychan::store::RedisStore::connect(&url).await.unwrap().with_prefix(store.prefix());
    assert_same_state(&memory, &other).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_store_unreachable_is_unavailable() {
    let error = paychan::store::RedisStore::connect("redis://127.0.0.1:9/")
        .await
        .expect_err("nothing listens on port 9");
    assert!(matches!(error, paychan::store::StoreError::Unavailable { .. }), "{error:?}");
}

/// Security review S8: a restarted server keeps its master key, so a fresh `MemoryStore` must
/// not hand out the indexes of the last run (0, 1, 2, …) again.
#[tokio::test]
async fn memory_stores_start_key_indexes_at_random() {
    let (a, b) = (MemoryStore::new(), MemoryStore::new());
    let (first_a, first_b) = (a.next_key_index().await.unwrap(), b.next_key_index().await.unwrap());
    assert_ne!(first_a, first_b, "two runs start apart (equal with probability 2^-30)");
    assert!(first_a < 1 << 30 && first_b < 1 << 30);
    assert_eq!(a.next_key_index().await.unwrap(), first_a + 1);
}
