//! The fast path's cache of verified payment headers.

use http::HeaderValue;

use crate::MilliSats;
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

/// Header values already verified as payments of a channel, with what they pay the server.
/// A verified payment stays a valid proof of its channel forever, so a hit skips decoding and
/// verification; the atomic debit still enforces the balance and the channel's state. At most
/// one header per channel (a new best replaces the old), so no client can crowd the others
/// out.
#[derive(Default)]
pub(in crate::server) struct VerifiedHeaders {
    by_value: FastMap<VerifiedHeader, (ChannelId, MilliSats)>,
    by_channel: FastMap<ChannelId, VerifiedHeader>,
}

impl VerifiedHeaders {
    /// The channel `header` pays on and what it pays the server, if it was verified.
    pub(super) fn get(&self, header: &VerifiedHeader) -> Option<(ChannelId, MilliSats)> {
        self.by_value.get(header).map(|entry| *entry)
    }

    /// Caches `header` as channel `id`'s verified best, in place of its previous best.
    pub(super) fn remember(&self, id: ChannelId, header: HeaderValue, carried: MilliSats) {
        let header = VerifiedHeader(header);
        if self.by_value.len() >= VERIFIED_CACHE_LIMIT {
            self.by_value.clear();
            self.by_channel.clear();
        }
        if let Some(previous) = self.by_channel.insert(id, header.clone())
            && previous != header
        {
            self.by_value.remove(&previous);
        }
        self.by_value.insert(header, (id, carried));
    }
}
