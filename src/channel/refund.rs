use bitcoin::secp256k1::SecretKey;
use bitcoin::{Amount, OutPoint, ScriptBuf, Sequence, Transaction, TxIn, TxOut, Witness, ecdsa};

use super::error::{FeeOutOfBounds, RefundError, SignError};
use super::params::{TX_VERSION, fee_at, funding_spend_weight};
use super::sig::{self, SignatureError};
use super::{ChainTip, ChannelParams, Terms};

/// The refund's input sequence: non-final so that the lock time is enforced, BIP-0068
/// disabled, no replace-by-fee signal.
pub const REFUND_SEQUENCE: Sequence = Sequence::ENABLE_LOCKTIME_NO_RBF;

/// A refund transaction (T2) that passed every server check and may be signed.
///
/// Returned by [`ChannelParams::check_refund`]; the only way to obtain the server's refund
/// signature is through it, so an unchecked refund is never signed.
#[derive(Debug, Clone, Copy)]
#[must_use]
pub struct CheckedRefund<'a> {
    params: &'a ChannelParams,
    refund: &'a Transaction,
}

impl CheckedRefund<'_> {
    /// The funding outpoint the refund spends: the channel's id.
    pub fn funding_outpoint(&self) -> OutPoint {
        self.refund.input[0].previous_output
    }

    /// Signs the refund with the server's key (BIP-0143, `SIGHASH_ALL`, committing to the
    /// channel value).
    ///
    /// # Errors
    ///
    /// [`SignError::WrongKey`] if `server_secret` is not the key of
    /// [`server_key`](ChannelParams::server_key).
    pub fn sign(&self, server_secret: &SecretKey) -> Result<ecdsa::Signature, SignError> {
        self.params.sign_input(self.refund, server_secret, &self.params.server_key)
    }
}

impl ChannelParams {
    /// Builds the unsigned refund (client side, seed step 3): spends `funding_outpoint` back
    /// to the client script, paying `fee`, locked until [`expiry`](Self::expiry).
    ///
    /// [`refund_fee`](Self::refund_fee) is the smallest fee the server accepts.
    pub fn build_refund(&self, funding_outpoint: OutPoint, fee: Amount) -> Transaction {
        Transaction {
            version: TX_VERSION,
            lock_time: self.expiry,
            input: vec![TxIn {
                previous_output: funding_outpoint,
                script_sig: ScriptBuf::new(),
                sequence: REFUND_SEQUENCE,
                witness: Witness::new(),
            }],
            output: vec![TxOut {
                value: self.value.checked_sub(fee).unwrap_or(Amount::ZERO),
                script_pubkey: self.client_script.clone(),
            }],
        }
    }

    /// Checks a refund before the server signs it (seed step 4).
    ///
    /// `funding` is the client's **unsigned** funding transaction; its inputs must all be
    /// segwit so that signing does not change its txid (see `docs/PROTOCOL.md`). The checks,
    /// in order: exactly one input, with an empty scriptSig, spending an output of `funding` that is the channel's
    /// P2WSH holding exactly the agreed value; version 2; exactly one output, to the client's
    /// script; a non-final sequence; lock time equal to the agreed expiry, which must still
    /// lie within `terms`' lifetime bounds at `tip`; no dust; a fee of exactly the agreed
    /// minimum rate at the co-signed size ([`refund_fee`](Self::refund_fee)), so that no
    /// refund can outbid a close.
    ///
    /// # Errors
    ///
    /// The first failed check as a [`RefundError`].
    pub fn check_refund<'a>(
        &'a self,
        terms: &Terms,
        funding: &Transaction,
        refund: &'a Transaction,
        tip: ChainTip,
    ) -> Result<CheckedRefund<'a>, RefundError> {
        let [input] = refund.input.as_slice() else {
            return Err(RefundError::InputCount { found: refund.input.len() });
        };
        if !input.script_sig.is_empty() {
            return Err(RefundError::ScriptSig);
        }
        let outpoint = input.previous_output;
        let funding_txid = funding.compute_txid();
        if outpoint.txid != funding_txid {
            return Err(RefundError::WrongFundingTxid {
                expected: funding_txid,
                found: outpoint.txid,
            });
        }
        if funding.is_coinbase() {
            return Err(RefundError::CoinbaseFunding);
        }
        let funding_output = usize::try_from(outpoint.vout)
            .ok()
            .and_then(|vout| funding.output.get(vout))
            .filter(|out| out.script_pubkey == self.funding_script_pubkey())
            .ok_or(RefundError::WrongFundingScript { outpoint })?;
        if funding_output.value != self.value {
            return Err(RefundError::WrongFundingValue {
                expected: self.value,
                found: funding_output.value,
            });
        }
        if refund.version != TX_VERSION {
            return Err(RefundError::Version { found: refund.version.0 });
        }
        let [output] = refund.output.as_slice() else {
            return Err(RefundError::OutputCount { found: refund.output.len() });
        };
        if output.script_pubkey != self.client_script {
            return Err(RefundError::WrongOutputScript);
        }
        if input.sequence == Sequence::MAX {
            return Err(RefundError::FinalSequence);
        }
        if refund.lock_time != self.expiry {
            return Err(RefundError::WrongLockTime {
                expected: self.expiry,
                found: refund.lock_time,
            });
        }
        terms.check_expiry(self.expiry, tip).map_err(RefundError::Expiry)?;
        let fee = self.value.checked_sub(output.value).ok_or(RefundError::ValueCreation)?;
        let threshold = self.client_script.minimal_non_dust();
        if output.value < threshold {
            return Err(RefundError::DustOutput { value: output.value, threshold });
        }
        let weight = funding_spend_weight(&[self.client_script.len()]);
        let required = fee_at(self.min_fee_rate, weight);
        if fee < required {
            return Err(RefundError::Fee(FeeOutOfBounds::TooLow { fee, required }));
        }
        // The refund pays exactly the minimum rate: a close (at the minimum rate or more, and
        // larger) always outbids it, so a refund broadcast at the expiry cannot replace a
        // pending close. The client can bump its refund by CPFP from its own output.
        if fee > required {
            return Err(RefundError::Fee(FeeOutOfBounds::TooHigh { fee, max: required }));
        }
        Ok(CheckedRefund { params: self, refund })
    }

    /// Verifies the server's refund signature (client side, seed step 5). A client must abort
    /// the channel, and never sign or broadcast its funding, if this fails.
    ///
    /// # Errors
    ///
    /// [`SignatureError`] if the signature is not `SIGHASH_ALL` or does not verify for
    /// [`server_key`](Self::server_key) over the refund.
    pub fn verify_refund_signature(
        &self,
        refund: &Transaction,
        server_signature: &ecdsa::Signature,
    ) -> Result<(), SignatureError> {
        let bytes = server_signature.to_vec();
        let parsed = sig::parse_sighash_all(&bytes)?;
        let msg = self.sighash(refund).ok_or(SignatureError::Invalid)?;
        sig::verify(&msg, &parsed, &self.server_key)
    }

    /// Completes the refund with both signatures (client side), ready to broadcast once its
    /// lock time has passed.
    ///
    /// # Errors
    ///
    /// [`SignError::WrongKey`] if `client_secret` is not the key of [`client_key`](Self::client_key).
    pub fn complete_refund(
        &self,
        refund: &Transaction,
        client_secret: &SecretKey,
        server_signature: &ecdsa::Signature,
    ) -> Result<Transaction, SignError> {
        let client_signature = self.sign_input(refund, client_secret, &self.client_key)?;
        Ok(self.with_witness(refund, &client_signature, server_signature))
    }
}
