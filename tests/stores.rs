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

/// A fresh database path under the system's temporary directory.
#[cfg(feature = "sqlite")]
fn temp_db(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("paychan-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("channels.sqlite3")
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_store_conforms() {
    let store = paychan::store::SqliteStore::open(temp_db("conforms")).unwrap();
    conformance::run(Arc::new(store), 0x01).await;
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_keeps_everything_across_a_reopen() {
    use paychan::store::{ChannelState, ChannelStore, SqliteStore};
    let path = temp_db("reopen");
    let memory = MemoryStore::new();
    {
        let store = Arc::new(SqliteStore::open(&path).unwrap());
        // Same operations on both stores: the SQLite one must read back what memory holds.
        conformance::run(store.clone(), 0x07).await;
        conformance::run(Arc::new(memory.clone()), 0x07).await;
        assert_eq!(store.next_key_index().await.unwrap(), memory.next_key_index().await.unwrap());
    }
    let reopened = SqliteStore::open(&path).unwrap();
    for state in [ChannelState::Open, ChannelState::Closing, ChannelState::Failed] {
        let mut expected = memory.list(state).await.unwrap();
        let mut found = reopened.list(state).await.unwrap();
        let key = |r: &paychan::store::ChannelRecord| r.id();
        expected.sort_by_key(key);
        found.sort_by_key(key);
        assert_eq!(found, expected, "{state:?} channels after reopening");
        assert!(!found.is_empty(), "the suite leaves {state:?} channels behind");
    }
    // Key indexes continue after a restart: a server key is never reused.
    assert_eq!(reopened.next_key_index().await.unwrap(), memory.next_key_index().await.unwrap());
}
