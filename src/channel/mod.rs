//! The payment channel protocol core: pure functions over transactions, with no I/O, no clock
//! and no randomness. Time enters as a [`ChainTip`] argument; keys enter as arguments.
//!
//! The channel is the classic unidirectional ("Spillman") contract on segwit v0, following
//! the seed's nine steps:
//!
//! | step | who | what | here |
//! |---|---|---|---|
//! | 1 | both | client key K1, fresh server key K2; terms agreed | [`Terms::agree`] → [`ChannelParams`] |
//! | 2 | client | unsigned funding T1 paying the 2-of-2 P2WSH | [`ChannelParams::build_funding`] |
//! | 3 | client | refund T2 spending T1, locked until the expiry | [`ChannelParams::build_refund`] |
//! | 4 | server | checks and signs T2 | [`ChannelParams::check_refund`] → [`CheckedRefund::sign`] |
//! | 5 | client | verifies the server's refund signature, aborts if wrong | [`ChannelParams::verify_refund_signature`] |
//! | 6 | server | checks the signed T1 is the one T2 spends; broadcasts it | [`ChannelParams::check_funding`] |
//! | 7–8 | client | signs payments T3, each paying the server more | [`Channel::build_payment`], [`Channel::sign_payment`] |
//! | 9 | server | checks each T3; co-signs the best and broadcasts to close | [`Channel::check_payment`], [`Channel::close_transaction`] |
//!
//! The wire formats and every rule are specified, with test vectors, in `docs/PROTOCOL.md`.
//!
//! # Examples
//!
//! ```
//! use bitcoin::absolute::LockTime;
//! use bitcoin::secp256k1::{Secp256k1, SecretKey};
//! use bitcoin::{Amount, CompressedPublicKey, OutPoint, ScriptBuf, Txid, hashes::Hash};
//! use paychan::channel::{ChainTip, PaymentCheck, Terms};
//!
//! let secp = Secp256k1::new();
//! let (k1, k2) = (SecretKey::from_slice(&[1; 32])?, SecretKey::from_slice(&[2; 32])?);
//! let pk = |k: &SecretKey| CompressedPublicKey(k.public_key(&secp));
//! let script = |k: &SecretKey| ScriptBuf::new_p2wpkh(&pk(k).wpubkey_hash());
//! let tip = ChainTip { height: 800_000, median_time_past: 1_700_000_000 };
//!
//! // Step 1: the server agrees to a 100 000 sat channel expiring in 1 000 blocks.
//! let params = Terms::default().agree(
//!     pk(&k1), pk(&k2), Amount::from_sat(100_000), LockTime::from_height(801_000)?,
//!     script(&k1), script(&k2), tip,
//! )?;
//! // Steps 2-6 (funding and refund) are elided: say T1 created this outpoint.
//! let channel = params.at(OutPoint { txid: Txid::all_zeros(), vout: 0 });
//!
//! // Step 7-8: the client pays the server 1 000 sat in total.
//! let mut t3 = channel.build_payment(Amount::from_sat(1_000))?;
//! channel.sign_payment(&mut t3, &k1)?;
//!
//! // Step 9: the server checks it against its best payment so far (none).
//! let check = channel.check_payment(None, &t3, tip)?;
//! assert_eq!(check, PaymentCheck::Increase {
//!     previous: Amount::ZERO,
//!     server_amount: Amount::from_sat(1_000),
//! });
//! let close = channel.close_transaction(&t3, &k2)?;
//! assert_eq!(close.input[0].witness.len(), 4);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::sync::OnceLock;

use bitcoin::secp256k1::{All, Message, Secp256k1, SecretKey};
use bitcoin::sighash::{EcdsaSighashType, SighashCache};
use bitcoin::{CompressedPublicKey, OutPoint, Script, Transaction, Witness, ecdsa};
use serde::{Deserialize, Serialize};

mod error;
mod funding;
mod ledger;
mod lifecycle;
mod params;
mod payment;
mod refund;
pub mod sig;
mod tip;

pub use error::{
    CloseError, ExpiryOutOfBounds, FeeOutOfBounds, FundingError, OpenError, PaymentError,
    RefundError, SignError,
};
pub use ledger::Ledger;
pub use lifecycle::{
    ChannelState, FundingAction, FundingPolicy, ParseChannelStateError, bump_is_due,
};
#[cfg(test)]
pub(crate) use params::test_params;
pub use params::{
    ChannelParams, FUNDING_SPEND_WITNESS_WEIGHT, LifetimeBounds, TX_VERSION, Terms,
    is_standard_payout,
};
#[cfg(feature = "runtime")]
pub(crate) use payment::PaymentChecker;
pub use payment::{CheckedPayment, NewPayment, PaymentCheck, server_amount};
pub use refund::{CheckedRefund, REFUND_SEQUENCE};
pub use tip::ChainTip;

/// Derives a channel key at `m/<index>'` of `master`: the server's K2 (index from
/// [`ChannelStore::next_key_index`](crate::store::ChannelStore::next_key_index)) and the
/// client's K1 (index from its client store) are both derived this way.
///
/// # Errors
///
/// If `index` is not below 2^31 (not a hardened index).
///
/// # Examples
///
/// ```
/// use bitcoin::Network;
/// use bitcoin::bip32::Xpriv;
/// use paychan::channel::channel_key;
///
/// let master = Xpriv::new_master(Network::Regtest, &[1; 32]).unwrap();
/// assert_ne!(channel_key(&master, 0).unwrap(), channel_key(&master, 1).unwrap());
/// assert!(channel_key(&master, 1 << 31).is_err());
/// ```
pub fn channel_key(
    master: &bitcoin::bip32::Xpriv,
    index: u32,
) -> Result<bitcoin::secp256k1::SecretKey, bitcoin::bip32::Error> {
    let child = bitcoin::bip32::ChildNumber::from_hardened_idx(index)?;
    Ok(master.derive_priv(secp(), &[child])?.private_key)
}

/// A funded channel: the agreed parameters and the funding outpoint (the channel's id).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Channel {
    params: ChannelParams,
    outpoint: OutPoint,
}

impl Channel {
    /// Creates the channel funded at `outpoint`.
    pub fn new(params: ChannelParams, outpoint: OutPoint) -> Self {
        Self { params, outpoint }
    }

    /// Returns the agreed parameters.
    pub fn params(&self) -> &ChannelParams {
        &self.params
    }

    /// Returns the funding outpoint, which identifies the channel.
    pub fn outpoint(&self) -> OutPoint {
        self.outpoint
    }
}

/// The crate's shared secp256k1 context.
pub(crate) fn secp() -> &'static Secp256k1<All> {
    static SECP: OnceLock<Secp256k1<All>> = OnceLock::new();
    SECP.get_or_init(Secp256k1::new)
}

impl ChannelParams {
    /// The BIP-0143 `SIGHASH_ALL` message for input 0 of `tx` spending the funding output;
    /// `None` if `tx` has no input.
    pub(crate) fn sighash(&self, tx: &Transaction) -> Option<Message> {
        self.sighash_with(tx, &self.witness_script())
    }

    /// [`sighash`](Self::sighash) with the channel's witness script, built by the caller.
    pub(crate) fn sighash_with(
        &self,
        tx: &Transaction,
        witness_script: &Script,
    ) -> Option<Message> {
        let sighash = SighashCache::new(tx)
            .p2wsh_signature_hash(0, witness_script, self.value, EcdsaSighashType::All)
            .ok()?;
        Some(Message::from(sighash))
    }

    /// Signs input 0 of `tx` for `expected`, refusing a key that is not `expected`'s.
    pub(crate) fn sign_input(
        &self,
        tx: &Transaction,
        secret: &SecretKey,
        expected: &CompressedPublicKey,
    ) -> Result<ecdsa::Signature, SignError> {
        if sig::public_key(secret) != *expected {
            return Err(SignError::WrongKey);
        }
        let msg = self.sighash(tx).ok_or(SignError::NoInput)?;
        Ok(sig::sign_all(&msg, secret))
    }

    /// Returns `tx` with the full 2-of-2 witness `[<empty>, sig, sig, witness_script]`, the
    /// signatures in key order.
    pub(crate) fn with_witness(
        &self,
        tx: &Transaction,
        client: &ecdsa::Signature,
        server: &ecdsa::Signature,
    ) -> Transaction {
        let [first, _] = self.sorted_keys();
        let (a, b) = if first == self.client_key { (client, server) } else { (server, client) };
        let mut witness = Witness::new();
        witness.push([]);
        witness.push_ecdsa_signature(a);
        witness.push_ecdsa_signature(b);
        witness.push(self.witness_script().as_bytes());
        let mut tx = tx.clone();
        // A witness spend carries no scriptSig (consensus: SCRIPT_ERR_WITNESS_MALLEATED); the
        // signatures do not commit to it, so clearing it keeps them valid.
        tx.input[0].script_sig = bitcoin::ScriptBuf::new();
        tx.input[0].witness = witness;
        tx
    }
}
