//! The fast path's cache of verified payment headers.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::mapref::entry::Entry;
use http::HeaderValue;

use crate::MilliSats;
use crate::channel::PaymentChecker;
use crate::maps::FastMap;
use crate::wire::ChannelId;

/// A verified `Payment-Channel` header value, as the fast-path cache's key. Equal when the
/// whole values are equal; hashed over the value's length and its last [`Self::HASHED`] bytes
/// only: the base64 of a payment ends with the client's signature (its last ~32 bytes, which
/// depend on the payment's sighash) and the lock time, so no two payments share them.
/// Hashing all of a 250-byte header was a tenth of the layer's own cost per request. Keys that
/// agree on the hashed bytes would merely share a bucket (the hasher is keyed; entries are
/// only ever verified payments, at most one per channel).
#[derive(PartialEq, Eq, Clone)]
pub(super) struct VerifiedHeader(pub(super) HeaderValue);

impl VerifiedHeader {
    const HASHED: usize = 48;
}

impl std::hash::Hash for VerifiedHeader {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let bytes = self.0.as_bytes();
        state.write_usize(bytes.len());
        state.write(&bytes[bytes.len().saturating_sub(Self::HASHED)..]);
    }
}

/// How many verified headers (one per channel) the fast-path cache keeps before it starts
/// over.
pub(super) const VERIFIED_CACHE_LIMIT: usize = 100_000;

/// Header values already verified as payments of a channel, with what they pay the server,
/// and the terms of the channels they pay on.
///
/// A verified payment stays a valid proof of its channel forever, so a hit skips decoding and
/// verification; the atomic debit still enforces the balance and the channel's state. At most
/// one header per channel, the one paying the most this node has seen (a better one replaces
/// it), so no client can crowd the others out.
///
/// A channel's terms ([`Channel`](crate::channel::Channel)) never change once its record is
/// created (no store operation changes them), so a new payment on a channel this node has
/// verified a payment of is checked against the terms kept here and stored in **one** store
/// operation ([`ChannelStore::pay`](crate::store::ChannelStore::pay), which stores it only if
/// it pays more and the channel is open): no load first. Up to [`VERIFIED_CACHE_LIMIT`]
/// channels' terms (a few hundred bytes each) are kept.
#[derive(Default)]
pub(in crate::server) struct VerifiedHeaders {
    by_value: FastMap<VerifiedHeader, (ChannelId, MilliSats)>,
    by_channel: FastMap<ChannelId, Known>,
    /// How many channels were added since the cache last started over (`DashMap::len` locks
    /// every shard: too dear for every new payment).
    channels: AtomicUsize,
}

/// What the cache knows of one channel.
struct Known {
    /// Its verified header paying the most.
    header: VerifiedHeader,
    /// What that header's payment pays the server.
    carried: MilliSats,
    /// The channel's terms, ready to check payments.
    channel: Arc<PaymentChecker>,
}

impl VerifiedHeaders {
    /// The channel `header` pays on and what it pays the server, if it was verified.
    pub(super) fn get(&self, header: &VerifiedHeader) -> Option<(ChannelId, MilliSats)> {
        self.by_value.get(header).map(|entry| *entry)
    }

    /// The terms of channel `id` and what its cached header pays, if a payment of it was
    /// verified here.
    pub(super) fn terms(&self, id: ChannelId) -> Option<(Arc<PaymentChecker>, MilliSats)> {
        self.by_channel.get(&id).map(|known| (Arc::clone(&known.channel), known.carried))
    }

    /// Caches `header`, a verified payment of `channel` (`id`) the store holds (or a better
    /// one), paying the server `carried`: as the channel's header, unless the one cached pays
    /// at least as much (a payment that raced a top-up identifies its channel, but does not
    /// displace the better one from the fast path). The value is copied out of the request:
    /// a header from hyper shares the connection's whole read buffer.
    pub(super) fn remember(
        &self,
        id: ChannelId,
        header: &HeaderValue,
        carried: MilliSats,
        channel: Arc<PaymentChecker>,
    ) {
        if self.channels.load(Ordering::Relaxed) >= VERIFIED_CACHE_LIMIT {
            self.channels.store(0, Ordering::Relaxed);
            self.by_value.clear();
            self.by_channel.clear();
        }
        let copied = || {
            let bytes = bytes::Bytes::copy_from_slice(header.as_bytes());
            // A header's value is a valid value: the copy is too.
            VerifiedHeader(HeaderValue::from_maybe_shared(bytes).unwrap_or_else(|_| header.clone()))
        };
        // Both maps change under the channel's entry: one header of a channel in `by_value`
        // at a time, whatever the races between these calls. (A clear racing one can leave a
        // verified header in `by_value` without its channel entry, until the next clear: a
        // valid proof all the same.)
        match self.by_channel.entry(id) {
            Entry::Occupied(known) if known.get().carried >= carried => {}
            Entry::Occupied(mut known) => {
                let header = copied();
                self.by_value.insert(header.clone(), (id, carried));
                let previous = known.insert(Known { header, carried, channel });
                self.by_value.remove(&previous.header);
            }
            Entry::Vacant(vacant) => {
                let header = copied();
                self.by_value.insert(header.clone(), (id, carried));
                vacant.insert(Known { header, carried, channel });
                self.channels.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bitcoin::hashes::Hash;
    use bitcoin::{OutPoint, Txid};

    use super::*;

    fn checker() -> Arc<PaymentChecker> {
        let outpoint = OutPoint { txid: Txid::from_byte_array([3; 32]), vout: 0 };
        Arc::new(PaymentChecker::new(crate::channel::test_params(1, 2).at(outpoint)))
    }

    fn id(n: u32) -> ChannelId {
        ChannelId::new(OutPoint { txid: Txid::from_byte_array([7; 32]), vout: n })
    }

    fn header(n: u64) -> HeaderValue {
        HeaderValue::from(n)
    }

    #[test]
    fn keeps_the_header_paying_the_most_per_channel() {
        let (cache, checker) = (VerifiedHeaders::default(), checker());
        let msat = MilliSats::from_msat;
        cache.remember(id(0), &header(2), msat(2), checker.clone());
        cache.remember(id(0), &header(1), msat(1), checker.clone());
        let cached = |n| cache.get(&VerifiedHeader(header(n)));
        assert_eq!((cached(2), cached(1)), (Some((id(0), msat(2))), None), "an older one waits");
        cache.remember(id(0), &header(3), msat(3), checker.clone());
        assert_eq!((cached(3), cached(2)), (Some((id(0), msat(3))), None), "a better one replaces");
        assert_eq!(cache.terms(id(0)).map(|(_, carried)| carried), Some(msat(3)));
        assert!(cache.terms(id(1)).is_none());
    }

    #[test]
    fn starts_over_past_its_limit_of_channels() {
        let (cache, checker) = (VerifiedHeaders::default(), checker());
        for n in 0..VERIFIED_CACHE_LIMIT as u32 {
            cache.remember(id(n), &header(n.into()), MilliSats::from_msat(1), checker.clone());
        }
        assert!(cache.terms(id(0)).is_some());
        assert_eq!(cache.by_value.len(), VERIFIED_CACHE_LIMIT);
        let last = VERIFIED_CACHE_LIMIT as u32;
        cache.remember(id(last), &header(last.into()), MilliSats::from_msat(1), checker);
        assert!(cache.terms(id(0)).is_none(), "started over");
        assert_eq!(cache.by_value.len(), 1);
        assert_eq!(cache.by_channel.len(), 1);
        assert!(cache.terms(id(last)).is_some());
    }
}
