use core::fmt;

use bitcoin::secp256k1::SecretKey;
use bitcoin::{Amount, Transaction, Txid};
use serde::{Deserialize, Serialize};

use super::store::{ClientStore, ClientStoreError};
use super::{PolicyRefusal, WalletError};
use crate::chain::{ChainBackend, ChainError};
use crate::channel::{Channel, PaymentError, SignError};
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
}

/// Why a client operation failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum ClientError {
    /// A payment must pay the server more than the latest one.
    NotAnIncrease {
        /// Paid so far.
        paid: Amount,
        /// Asked for.
        requested: Amount,
    },
    /// The payment cannot be built (dust, or more than the channel holds).
    Payment(PaymentError),
    /// The key does not belong to the channel.
    Sign(SignError),
    /// The client store failed; the payment was not sent.
    Store(ClientStoreError),
    /// The chain backend failed.
    Chain(ChainError),
    /// The spending policy refused.
    Policy(PolicyRefusal),
    /// A channel must be opened, and the client has no [`Wallet`](super::Wallet) to fund it.
    NoWallet,
    /// There is no channel to act on.
    NoChannel,
    /// The wallet failed to fund or sign the funding transaction.
    Wallet(WalletError),
    /// The server's refund signature does not verify: the channel was abandoned before the
    /// funding was signed, and no money moved.
    InvalidRefundSignature,
    /// The server answered something the protocol does not allow (a proposal that differs
    /// from the request, a settlement that is not the client's payment, …).
    ServerMisbehaved(String),
    /// The server refused, and the client cannot or may not fix it by paying.
    Rejected {
        /// The response's status.
        status: http::StatusCode,
        /// The problem's code (`urn:paychan:problem:<code>`), empty if the body had none.
        code: String,
        /// The problem's detail.
        detail: String,
    },
    /// The HTTP client failed.
    Transport(tower::BoxError),
    /// The server is not `http(s)://host[:port]`.
    InvalidOrigin(String),
    /// A client key could not be derived.
    Key(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotAnIncrease { paid, requested } => {
                write!(f, "a payment of {requested} does not exceed the {paid} already paid")
            }
            Self::Payment(e) => write!(f, "cannot build the payment: {e}"),
            Self::Sign(e) => write!(f, "cannot sign: {e}"),
            Self::Store(e) => write!(f, "client store: {e}"),
            Self::Chain(e) => write!(f, "chain: {e}"),
            Self::Policy(e) => write!(f, "spending policy: {e}"),
            Self::NoWallet => f.write_str("a channel must be opened and there is no wallet"),
            Self::NoChannel => f.write_str("no channel with this server"),
            Self::Wallet(e) => write!(f, "wallet: {e}"),
            Self::InvalidRefundSignature => {
                f.write_str("the server's refund signature is invalid; the channel was abandoned")
            }
            Self::ServerMisbehaved(what) => write!(f, "the server broke the protocol: {what}"),
            Self::Rejected { status, code, detail } => {
                write!(f, "the server refused ({status}, {code}): {detail}")
            }
            Self::Transport(e) => write!(f, "http: {e}"),
            Self::InvalidOrigin(origin) => {
                write!(f, "{origin:?} is not an http(s)://host[:port] origin")
            }
            Self::Key(e) => write!(f, "key derivation: {e}"),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Payment(e) => Some(e),
            Self::Sign(e) => Some(e),
            Self::Store(e) => Some(e),
            Self::Chain(e) => Some(e),
            Self::Policy(e) => Some(e),
            Self::Wallet(e) => Some(e),
            Self::Transport(e) => Some(&**e),
            _ => None,
        }
    }
}

impl ClientChannel {
    /// A freshly funded channel with its signed refund and no payment yet.
    pub fn new(channel: Channel, key_index: u32, refund: Transaction) -> Self {
        Self { channel, key_index, refund, latest: None, server: String::new(), retired: false }
    }

    /// The channel's id.
    pub fn id(&self) -> ChannelId {
        ChannelId::new(self.channel.outpoint())
    }

    /// What the latest payment pays the server.
    pub fn paid(&self) -> Amount {
        self.latest.as_ref().and_then(|tx| tx.output.first()).map_or(Amount::ZERO, |out| out.value)
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
