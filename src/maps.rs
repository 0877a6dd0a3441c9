//! The concurrent maps of the per-request path.

/// A concurrent map of the per-request path (the fast path's cache, the receipts' batches,
/// the memory store's channels, the leases), hashed with `foldhash`: a few nanoseconds per
/// key where the standard SipHash took a tenth of the fast path's own cost. Its seed is
/// random per process. Only for keys a client must pay for before one is inserted (a funded
/// channel, a verified payment): a client who chooses keys for free (an idempotency key)
/// gets the standard hasher, which resists collisions chosen to slow the map.
pub(crate) type FastMap<K, V> = dashmap::DashMap<K, V, foldhash::fast::RandomState>;
