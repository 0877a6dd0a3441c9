#[cfg(feature = "runtime")]
use bitcoin::Txid;
#[cfg(feature = "runtime")]
use bitcoin::secp256k1::SecretKey;
use bitcoin::{Amount, Transaction};
use serde::{Deserialize, Serialize};

#[cfg(feature = "runtime")]
use super::{ClientError, ClientStore};
#[cfg(feature = "runtime")]
use crate::chain::ChainBackend;
use crate::channel::Channel;
use crate::wire::{self, ChannelId};

/// A channel as its client keeps it: the agreed channel, the derivation index of the client
/// key, the fully signed refund, and the latest payment.
///
/// The refund and every payment are saved in a [`ClientStore`] **before** they are used: a
/// payment header is only returned by [`pay`](Self::pay) once the store has it, so a crash never
/// loses a payment the server might already hold, nor the refund.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientChannel {
    /// The agreed parameters and the funding outpoint.
    pub channel: Channel,
    /// The BIP-0032 index the client key K1 was derived at.
    pub key_index: u32,
    /// The refund, signed by both sides, valid once the channel expires.
    pub refund: Transaction,
    /// The latest signed payment.
    pub latest: Option<Transaction>,
    /// The origin (`scheme://authority`) of the server the channel is with; empty when the
    /// channel was opened by hand.
    #[serde(default)]
    pub server: String,
    /// Set once the client stopped paying on the channel (closed, or refused by the server):
    /// a [`Payer`](super::Payer) never picks it again. The refund is still kept.
    #[serde(default)]
    pub retired: bool,
    /// Set once the channel's money is back or settled (closed cooperatively, or refunded):
    /// it no longer counts as locked.
    #[serde(default)]
    pub closed: bool,
    /// What the funding transaction paid in fees (counted in the policy's budget).
    #[serde(default, with = "bitcoin::amount::serde::as_sat")]
    pub funding_fee: Amount,
    /// The signed funding transaction while the server has not acknowledged it (`/fund`
    /// failed or timed out): the server holds it and may broadcast it at any time. While it
    /// is set and the channel is not closed, a [`Payer`](super::Payer) signs no other funding
    /// that does not spend one of its inputs (at most one of them can confirm), unless its
    /// chain view shows it broadcast or conflicted. Cleared once a funding is acknowledged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unacknowledged_funding: Option<Transaction>,
}

impl ClientChannel {
    /// A freshly funded channel with its signed refund and no payment yet.
    pub fn new(channel: Channel, key_index: u32, refund: Transaction) -> Self {
        Self {
            channel,
            key_index,
            refund,
            latest: None,
            server: String::new(),
            retired: false,
            closed: false,
            funding_fee: Amount::ZERO,
            unacknowledged_funding: None,
        }
    }

    /// The channel's id.
    pub fn id(&self) -> ChannelId {
        ChannelId::new(self.channel.outpoint())
    }

    /// What the latest payment pays the server.
    pub fn paid(&self) -> Amount {
        self.latest.as_ref().map_or(Amount::ZERO, crate::channel::server_amount)
    }

    /// The `Payment-Channel` header of the latest payment.
    pub fn header(&self) -> Option<String> {
        self.latest.as_ref().map(wire::encode_payment)
    }

    /// Signs a payment of `total` to the server, saves it in `store`, and only then returns its
    /// `Payment-Channel` header.
    ///
    /// # Errors
    ///
    /// [`ClientError::NotAnIncrease`], [`ClientError::Payment`], [`ClientError::Sign`], or
    /// [`ClientError::Store`] — in every case nothing changed and nothing may be sent.
    #[cfg(feature = "runtime")]
    pub async fn pay<S: ClientStore>(
        &mut self,
        store: &S,
        client_secret: &SecretKey,
        total: Amount,
    ) -> Result<String, ClientError> {
        if total <= self.paid() {
            return Err(ClientError::NotAnIncrease { paid: self.paid(), requested: total });
        }
        let mut payment = self.channel.build_payment(total).map_err(ClientError::Payment)?;
        self.channel.sign_payment(&mut payment, client_secret).map_err(ClientError::Sign)?;
        let next = Self { latest: Some(payment), ..self.clone() };
        store.save(&next).await.map_err(ClientError::Store)?;
        *self = next;
        Ok(self.header().expect("a payment was just recorded"))
    }

    /// Broadcasts the refund once its lock time has passed; `Ok(None)` while it cannot be
    /// mined yet.
    ///
    /// # Errors
    ///
    /// [`ClientError::Chain`] if the backend fails or refuses the refund (for example because
    /// the server already closed the channel: the funding output is spent).
    #[cfg(feature = "runtime")]
    pub async fn refund_if_expired<C: ChainBackend>(
        &self,
        chain: &C,
    ) -> Result<Option<Txid>, ClientError> {
        let tip = chain.tip().await.map_err(ClientError::Chain)?;
        if !self.channel.params().refund_is_valid(tip) {
            return Ok(None);
        }
        chain.broadcast(&self.refund).await.map(Some).map_err(ClientError::Chain)
    }
}
