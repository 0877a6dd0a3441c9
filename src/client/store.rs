use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use super::ClientChannel;
use crate::wire::ChannelId;

/// Where a client keeps its channels. `save` must be durable (for its kind of store) when it
/// returns: a payment is sent only after it was saved.
pub trait ClientStore: Send + Sync {
    /// Saves (creates or replaces) a channel.
    fn save(
        &self,
        channel: &ClientChannel,
    ) -> impl Future<Output = Result<(), ClientStoreError>> + Send;

    /// Loads a channel; `Ok(None)` if unknown.
    fn load(
        &self,
        id: ChannelId,
    ) -> impl Future<Output = Result<Option<ClientChannel>, ClientStoreError>> + Send;

    /// Lists every channel.
    fn list(&self) -> impl Future<Output = Result<Vec<ClientChannel>, ClientStoreError>> + Send;

    /// Allocates the next BIP-0032 index for a client key K1: never the same index twice, also
    /// across restarts, so no two channels share a key.
    fn next_key_index(&self) -> impl Future<Output = Result<u32, ClientStoreError>> + Send;
}

/// A client store failure: what the store reported. Implementers of [`ClientStore`] build it
/// with `ClientStoreError::new(error_or_message)`.
pub type ClientStoreError = crate::BackendError;

/// Channels in process memory (tests, short-lived clients): lost on exit, refunds included.
#[derive(Debug, Clone, Default)]
pub struct MemoryClientStore {
    channels: Arc<Mutex<HashMap<ChannelId, ClientChannel>>>,
    next_index: Arc<AtomicU32>,
}

impl MemoryClientStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<ChannelId, ClientChannel>> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ClientStore for MemoryClientStore {
    async fn save(&self, channel: &ClientChannel) -> Result<(), ClientStoreError> {
        self.map().insert(channel.id(), channel.clone());
        Ok(())
    }

    async fn load(&self, id: ChannelId) -> Result<Option<ClientChannel>, ClientStoreError> {
        Ok(self.map().get(&id).cloned())
    }

    async fn list(&self) -> Result<Vec<ClientChannel>, ClientStoreError> {
        Ok(self.map().values().cloned().collect())
    }

    async fn next_key_index(&self) -> Result<u32, ClientStoreError> {
        next_index(self.next_index.fetch_add(1, Ordering::SeqCst))
    }
}

/// Indices are hardened (below 2^31).
fn next_index(index: u32) -> Result<u32, ClientStoreError> {
    if index < 1 << 31 { Ok(index) } else { Err(ClientStoreError::new("no key index left")) }
}

/// Channels as JSON files in a directory, one per channel. A save writes a temporary file,
/// fsyncs it, renames it over the old one and fsyncs the directory: when `save` returns, the
/// new state is on disk, and a crash at any point leaves either the old or the new file.
#[derive(Debug, Clone)]
pub struct FileClientStore {
    dir: PathBuf,
    /// Serialises key-index allocations within this process.
    index_lock: Arc<Mutex<()>>,
}

impl FileClientStore {
    /// Uses (and creates) `dir`.
    ///
    /// # Errors
    ///
    /// If the directory cannot be created.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, ClientStoreError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(ClientStoreError::new)?;
        Ok(Self { dir, index_lock: Arc::default() })
    }

    fn path(&self, id: ChannelId) -> PathBuf {
        let outpoint = id.outpoint();
        self.dir.join(format!("{}-{}.json", outpoint.txid, outpoint.vout))
    }

    async fn blocking<T: Send + 'static>(
        f: impl FnOnce() -> Result<T, ClientStoreError> + Send + 'static,
    ) -> Result<T, ClientStoreError> {
        tokio::task::spawn_blocking(f).await.map_err(ClientStoreError::new)?
    }
}

/// Writes `bytes` to `path` atomically and durably: a temporary file, fsync, rename, fsync of
/// the directory.
fn write_durably(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), ClientStoreError> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp).map_err(ClientStoreError::new)?;
    file.write_all(bytes).map_err(ClientStoreError::new)?;
    file.sync_all().map_err(ClientStoreError::new)?;
    std::fs::rename(&tmp, path).map_err(ClientStoreError::new)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(ClientStoreError::new)
}

fn read(path: &std::path::Path) -> Result<ClientChannel, ClientStoreError> {
    let bytes = std::fs::read(path)
        .map_err(|e| ClientStoreError::new(format!("{}: {e}", path.display())))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ClientStoreError::new(format!("{}: {e}", path.display())))
}

impl ClientStore for FileClientStore {
    async fn save(&self, channel: &ClientChannel) -> Result<(), ClientStoreError> {
        let path = self.path(channel.id());
        let dir = self.dir.clone();
        let json = serde_json::to_vec_pretty(channel).map_err(ClientStoreError::new)?;
        Self::blocking(move || write_durably(&dir, &path, &json)).await
    }

    async fn load(&self, id: ChannelId) -> Result<Option<ClientChannel>, ClientStoreError> {
        let path = self.path(id);
        Self::blocking(move || if path.exists() { read(&path).map(Some) } else { Ok(None) }).await
    }

    async fn list(&self) -> Result<Vec<ClientChannel>, ClientStoreError> {
        let dir = self.dir.clone();
        Self::blocking(move || {
            let mut channels = Vec::new();
            for entry in std::fs::read_dir(&dir).map_err(ClientStoreError::new)? {
                let path = entry.map_err(ClientStoreError::new)?.path();
                if path.extension().is_some_and(|e| e == "json") {
                    channels.push(read(&path)?);
                }
            }
            Ok(channels)
        })
        .await
    }

    /// The next index is kept in the file `key-index`, written durably before the index is
    /// handed out.
    async fn next_key_index(&self) -> Result<u32, ClientStoreError> {
        let dir = self.dir.clone();
        let lock = Arc::clone(&self.index_lock);
        Self::blocking(move || {
            let _guard = lock.lock().unwrap_or_else(|p| p.into_inner());
            let path = dir.join("key-index");
            let index = match std::fs::read_to_string(&path) {
                Ok(text) => text
                    .trim()
                    .parse::<u32>()
                    .map_err(|e| ClientStoreError::new(format!("{}: {e}", path.display())))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
                Err(e) => return Err(ClientStoreError::new(e)),
            };
            let index = next_index(index)?;
            write_durably(&dir, &path, (index + 1).to_string().as_bytes())?;
            Ok(index)
        })
        .await
    }
}
