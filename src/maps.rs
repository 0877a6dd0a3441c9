//! The concurrent maps of the per-request path.

/// A concurrent map of the per-request path (the fast path's cache, the receipts' batches,
/// the memory store's channels, the leases), hashed with `foldhash`: a few nanoseconds per
/// key where the standard SipHash took a tenth of the fast path's own cost. foldhash seeds
/// itself per process (from addresses and the time) but does not claim to resist keys
/// chosen to collide, so this map is only for keys that cost money to insert: a funded
/// channel, a payment verified against one. Keys a client chooses for free (an idempotency
/// key, a pending proposal, a client address) stay with the standard hasher, which resists
/// them.
pub(crate) type FastMap<K, V> = dashmap::DashMap<K, V, foldhash::fast::RandomState>;
