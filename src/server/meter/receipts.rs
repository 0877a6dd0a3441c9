//! Receipts: when one is signed, the signer and its per-channel keys and batches.

use bitcoin::bip32::Xpriv;
use bitcoin::secp256k1::SecretKey;
use http::HeaderValue;

use super::Meter;
use super::cache::VERIFIED_CACHE_LIMIT;
use crate::MilliSats;
use crate::channel::channel_key;
use crate::maps::FastMap;
use crate::server::ReceiptSigning;
use crate::server::stream::Target;
use crate::store::{ChannelRecord, ChannelStore};
use crate::wire::{ChannelId, Compact, Receipt, UnsignedReceipts};

/// The receipts' signer: the master key, each channel's server key once derived, and when
/// to sign.
pub(super) struct Signer {
    master: Xpriv,
    keys: FastMap<ChannelId, SecretKey>,
    signing: ReceiptSigning,
    /// Per channel: the receipts this node left unsigned since it last signed one, and when.
    batches: FastMap<ChannelId, (u32, std::time::Instant)>,
}

impl Signer {
    pub(super) fn new(master: Xpriv, signing: ReceiptSigning) -> Self {
        let (keys, batches) = (FastMap::default(), FastMap::default());
        Self { master, keys, signing, batches }
    }

    /// Whether the receipt of `channel` for a client that said `unsigned` is signed (see
    /// [`ReceiptSigning::Batched`]); counts it either way. One map lookup per request.
    fn due(&self, channel: ChannelId, unsigned: Option<UnsignedReceipts>) -> bool {
        let (ReceiptSigning::Batched { every, within }, Some(said)) = (self.signing, unsigned)
        else {
            return true;
        };
        let now = std::time::Instant::now();
        let count = |batch: &mut (u32, std::time::Instant)| {
            let (left, since) = *batch;
            // The node's own count stops at the client's half too: a client that sends a
            // stale `held` still gets no more in a row than it said it accepts.
            let due = left == u32::MAX // this node's first receipt of the channel
                || said.must_sign(every)
                || left.saturating_add(1) >= every.min(said.max / 2)
                || now.duration_since(since) >= within;
            *batch = if due { (0, now) } else { (left + 1, since) };
            due
        };
        if let Some(mut batch) = self.batches.get_mut(&channel) {
            return count(&mut batch);
        }
        // A channel this node has not counted yet (its size is read with no entry held:
        // `len` locks every shard).
        if self.batches.len() >= VERIFIED_CACHE_LIMIT {
            self.batches.clear();
        }
        count(&mut self.batches.entry(channel).or_insert((u32::MAX, now)))
    }

    /// Derives and keeps the server key of `record`'s channel.
    pub(super) fn remember(&self, record: &ChannelRecord) {
        if !self.keys.contains_key(&record.id())
            && let Ok(key) = channel_key(&self.master, record.key_index)
        {
            if self.keys.len() >= VERIFIED_CACHE_LIMIT {
                self.keys.clear();
            }
            self.keys.insert(record.id(), key);
        }
    }
}

/// A paid response's receipt, before it goes in the `Payment-Receipt` header.
pub(super) enum ReceiptValue {
    /// Unsigned, in the compact form: the header's value.
    Unsigned(HeaderValue),
    /// Due a signature ([`Meter::signed_header`]).
    Due(Receipt),
}

impl<St: ChannelStore, P: Send + Sync + 'static> Meter<St, P> {
    /// The `Payment-Receipt` value of a request on `channel` to `target`, charged `charged`,
    /// carrying a payment of `carried`, `balance` left: the compact unsigned form, written
    /// at once (most receipts of a batch), or the receipt due a signature
    /// ([`signed_header`](Self::signed_header)).
    pub(super) fn receipt_header(
        &self,
        target: &Target,
        channel: ChannelId,
        charged: MilliSats,
        carried: MilliSats,
        balance: MilliSats,
    ) -> Option<ReceiptValue> {
        let signer = self.signer.as_ref()?;
        if !signer.due(channel, target.unsigned) {
            // The client completes it from its request (`Receipt::decode_for`).
            let compact = Compact::new(charged, balance);
            return HeaderValue::from_bytes(compact.as_bytes()).ok().map(ReceiptValue::Unsigned);
        }
        Some(ReceiptValue::Due(target.receipt(channel, charged, carried, balance)))
    }

    /// The `Payment-Receipt` value of `receipt`, signed.
    pub(super) async fn signed_header(&self, receipt: Receipt) -> Option<HeaderValue> {
        HeaderValue::try_from(self.sign_now(receipt).await?.encode()).ok()
    }

    /// Signs `receipt` with its channel's K2 (derived once per channel; a channel this node
    /// has not loaded yet is loaded for its key index).
    pub(super) async fn sign_now(&self, receipt: Receipt) -> Option<Receipt> {
        let signer = self.signer.as_ref()?;
        if !signer.keys.contains_key(&receipt.channel) {
            let record = self.config.store.load(receipt.channel).await.ok()??;
            signer.remember(&record);
        }
        let key = *signer.keys.get(&receipt.channel)?;
        Some(receipt.sign(&key))
    }
}
