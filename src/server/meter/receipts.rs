//! Receipts: when one is signed, the signer and its per-channel keys and batches.

use bitcoin::bip32::Xpriv;
use bitcoin::secp256k1::SecretKey;
use http::HeaderValue;

use super::Meter;
use super::cache::VERIFIED_CACHE_LIMIT;
use crate::MilliSats;
use crate::channel::channel_key;
use crate::server::ReceiptSigning;
use crate::server::stream::Target;
use crate::store::{ChannelRecord, ChannelStore};
use crate::wire::{ChannelId, Receipt, UnsignedReceipts};

/// The receipts' signer: the master key, each channel's server key once derived, and when
/// to sign.
pub(super) struct Signer {
    master: Xpriv,
    keys: dashmap::DashMap<ChannelId, SecretKey>,
    signing: ReceiptSigning,
    /// Per channel: the receipts this node left unsigned since it last signed one, and when.
    batches: dashmap::DashMap<ChannelId, (u32, std::time::Instant)>,
}

impl Signer {
    pub(super) fn new(master: Xpriv, signing: ReceiptSigning) -> Self {
        let (keys, batches) = (dashmap::DashMap::new(), dashmap::DashMap::new());
        Self { master, keys, signing, batches }
    }

    /// Whether the receipt of `channel` for a client that said `unsigned` is signed (see
    /// [`ReceiptSigning::Batched`]); counts it either way.
    fn due(&self, channel: ChannelId, unsigned: Option<UnsignedReceipts>) -> bool {
        let (ReceiptSigning::Batched { every, within }, Some(said)) = (self.signing, unsigned)
        else {
            return true;
        };
        let now = std::time::Instant::now();
        if self.batches.len() >= VERIFIED_CACHE_LIMIT && !self.batches.contains_key(&channel) {
            self.batches.clear();
        }
        let mut batch = self.batches.entry(channel).or_insert((u32::MAX, now));
        let (left, since) = *batch;
        let due = left == u32::MAX // this node's first receipt of the channel
            || said.must_sign(every)
            || left.saturating_add(1) >= every
            || now.duration_since(since) >= within;
        *batch = if due { (0, now) } else { (left + 1, since) };
        due
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

impl<St: ChannelStore, P: Send + Sync + 'static> Meter<St, P> {
    /// The `Payment-Receipt` value of a request on `channel` to `target`, charged `charged`,
    /// carrying a payment of `carried`, `balance` left: signed when due (most receipts in a
    /// batch go unsigned, with no signing future to box).
    pub(super) async fn receipt_header(
        &self,
        target: &Target,
        channel: ChannelId,
        charged: MilliSats,
        carried: MilliSats,
        balance: MilliSats,
    ) -> Option<HeaderValue> {
        let signer = self.signer.as_ref()?;
        if !signer.due(channel, target.unsigned) {
            // The compact form: the client completes it from its request (`Receipt::decode_for`).
            return HeaderValue::try_from(Receipt::encode_unsigned(charged, balance)).ok();
        }
        let receipt = target.receipt(channel, charged, carried, balance);
        let receipt = Box::pin(self.sign_now(receipt)).await?;
        HeaderValue::try_from(receipt.encode()).ok()
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
