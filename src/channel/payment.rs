use bitcoin::absolute::LockTime;
use bitcoin::secp256k1::SecretKey;
use bitcoin::{Amount, Script, ScriptBuf, Sequence, Transaction, TxIn, TxOut, Witness};

use super::error::{CloseError, FeeOutOfBounds, PaymentError, SignError};
use super::params::{TX_VERSION, fee_at, funding_spend_weight};
use super::sig;
use super::{ChainTip, Channel};

/// What a payment (or a close, which is a co-signed payment) pays the server: its output 0,
/// by the protocol's layout (server first, client change second). Zero for a transaction
/// without outputs.
///
/// # Examples
///
/// ```
/// use bitcoin::{Amount, ScriptBuf, Transaction, TxOut, absolute, transaction};
/// use paychan::channel::server_amount;
///
/// let mut tx = Transaction {
///     version: transaction::Version::TWO,
///     lock_time: absolute::LockTime::ZERO,
///     input: vec![],
///     output: vec![],
/// };
/// assert_eq!(server_amount(&tx), Amount::ZERO);
/// tx.output.push(TxOut { value: Amount::from_sat(700), script_pubkey: ScriptBuf::new() });
/// assert_eq!(server_amount(&tx), Amount::from_sat(700));
/// ```
pub fn server_amount(payment: &Transaction) -> Amount {
    payment.output.first().map_or(Amount::ZERO, |out| out.value)
}

/// A payment that passed every rule of its channel ([`Channel::check_new_payment`]): the
/// client's signature, the shape, the outputs, the fees, and more than the best the checker
/// knew, if it knew one (the server checks a payment on a channel whose terms it keeps
/// against the terms alone). Only the protocol core builds one, so a store that takes it
/// ([`ChannelStore::pay`](crate::store::ChannelStore::pay)) holds checked payments only; the
/// store still decides, atomically, whether it pays more than its own best.
#[derive(Debug, Clone)]
pub struct CheckedPayment {
    payment: Transaction,
    /// Its consensus serialization, when the checker decoded it from one: what a store keeps,
    /// without serializing the payment again.
    #[cfg_attr(not(feature = "runtime"), allow(dead_code))]
    encoded: Option<Vec<u8>>,
}

impl PartialEq for CheckedPayment {
    fn eq(&self, other: &Self) -> bool {
        self.payment == other.payment
    }
}

impl Eq for CheckedPayment {}

impl CheckedPayment {
    fn new(payment: Transaction) -> Self {
        Self { payment, encoded: None }
    }

    /// `payment`, which [`Channel::check_payment`] found to be an increase (for callers that
    /// checked it by reference and keep it for other uses), decoded from `encoded`, its
    /// consensus serialization ([`wire::decode_payment_encoded`](crate::wire)).
    #[cfg(feature = "runtime")]
    pub(crate) fn checked(payment: Transaction, encoded: Vec<u8>) -> Self {
        debug_assert_eq!(bitcoin::consensus::serialize(&payment), encoded);
        Self { payment, encoded: Some(encoded) }
    }

    /// The payment's consensus serialization.
    #[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
    pub(crate) fn encoded(&self) -> std::borrow::Cow<'_, [u8]> {
        match &self.encoded {
            Some(encoded) => encoded.into(),
            None => bitcoin::consensus::serialize(&self.payment).into(),
        }
    }

    /// The payment's consensus serialization, owned.
    #[cfg(feature = "runtime")]
    pub(crate) fn into_encoded(self) -> Vec<u8> {
        self.encoded.unwrap_or_else(|| bitcoin::consensus::serialize(&self.payment))
    }
}

impl CheckedPayment {
    /// The payment.
    pub fn transaction(&self) -> &Transaction {
        &self.payment
    }

    /// The payment, owned.
    pub fn into_transaction(self) -> Transaction {
        self.payment
    }

    /// What it pays the server.
    pub fn server_amount(&self) -> Amount {
        server_amount(&self.payment)
    }
}

/// A channel's terms with its witness script, built once: checks payments as
/// [`Channel::check_payment`] does, without rebuilding the script (two public keys
/// serialized) for every payment's sighash. What the server keeps of a channel it has
/// verified a payment of.
#[cfg(feature = "runtime")]
#[derive(Debug)]
pub(crate) struct PaymentChecker {
    channel: Channel,
    witness_script: ScriptBuf,
}

#[cfg(feature = "runtime")]
impl PaymentChecker {
    pub(crate) fn new(channel: Channel) -> Self {
        let witness_script = channel.params.witness_script();
        Self { channel, witness_script }
    }

    /// [`Channel::check_payment`].
    pub(crate) fn check_payment(
        &self,
        best: Option<&Transaction>,
        payment: &Transaction,
        tip: ChainTip,
    ) -> Result<PaymentCheck, PaymentError> {
        self.channel.check_payment_with(best, payment, tip, &self.witness_script)
    }

    /// [`Channel::verify_client_signature`].
    pub(crate) fn verify_client_signature(
        &self,
        payment: &Transaction,
    ) -> Result<(), PaymentError> {
        self.channel.verify_signature_with(payment, &self.witness_script)
    }
}

/// The outcome of [`Channel::check_new_payment`]: a checked payment that pays more, or the
/// best again.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum NewPayment {
    /// The payment pays the server more than the best: store it.
    Increase(CheckedPayment),
    /// The payment is the best again (see [`PaymentCheck::Repeat`]).
    Repeat,
}

/// The outcome of a successful [`Channel::check_payment`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum PaymentCheck {
    /// The payment is the channel's current best (byte-identical, or the same transaction
    /// with another valid client signature): nothing new was paid.
    Repeat,
    /// The payment is valid and pays the server more than the best so far.
    Increase {
        /// The server amount of the best payment so far (zero if none).
        previous: Amount,
        /// The server amount of this payment.
        server_amount: Amount,
    },
}

impl Channel {
    /// Builds an unsigned payment (client side, seed step 7) that pays the server
    /// `server_amount` in total, with the agreed minimum fee taken from the client's side.
    ///
    /// Output 0 pays the server; output 1, the change, is omitted when it would be dust (and
    /// then goes to the fee).
    ///
    /// # Errors
    ///
    /// [`PaymentError::ServerOutputDust`] or [`PaymentError::ValueCreation`] when the server
    /// would refuse the result.
    pub fn build_payment(&self, server_amount: Amount) -> Result<Transaction, PaymentError> {
        let params = &self.params;
        let threshold = params.min_server_amount();
        if server_amount < threshold {
            return Err(PaymentError::ServerOutputDust { value: server_amount, threshold });
        }
        let mut output =
            vec![TxOut { value: server_amount, script_pubkey: params.server_script.clone() }];
        let change = server_amount
            .checked_add(params.payment_fee(true))
            .and_then(|spent| params.value.checked_sub(spent));
        match change {
            Some(change) if change >= params.min_change() => {
                output.push(TxOut { value: change, script_pubkey: params.client_script.clone() })
            }
            _ => {
                let spent = server_amount.checked_add(params.payment_fee(false));
                if spent.is_none_or(|spent| spent > params.value) {
                    return Err(PaymentError::ValueCreation);
                }
            }
        }
        Ok(Transaction {
            version: TX_VERSION,
            lock_time: LockTime::ZERO,
            input: vec![TxIn {
                previous_output: self.outpoint,
                script_sig: ScriptBuf::new(),
                sequence: Sequence::MAX,
                witness: Witness::new(),
            }],
            output,
        })
    }

    /// Signs a payment with the client's key (seed step 8): the witness becomes exactly one
    /// item, the client's `SIGHASH_ALL` signature. This is the form the server accepts.
    ///
    /// # Errors
    ///
    /// [`SignError`] if `client_secret` is not the channel's client key.
    pub fn sign_payment(
        &self,
        payment: &mut Transaction,
        client_secret: &SecretKey,
    ) -> Result<(), SignError> {
        let signature = self.params.sign_input(payment, client_secret, &self.params.client_key)?;
        let mut witness = Witness::new();
        witness.push_ecdsa_signature(&signature);
        payment.input[0].witness = witness;
        Ok(())
    }

    /// [`check_payment`](Self::check_payment), keeping a payment that pays more as a
    /// [`CheckedPayment`] (what a store takes), without checking it twice.
    ///
    /// # Errors
    ///
    /// As [`check_payment`](Self::check_payment).
    pub fn check_new_payment(
        &self,
        best: Option<&Transaction>,
        payment: Transaction,
        tip: ChainTip,
    ) -> Result<NewPayment, PaymentError> {
        Ok(match self.check_payment(best, &payment, tip)? {
            PaymentCheck::Increase { .. } => NewPayment::Increase(CheckedPayment::new(payment)),
            PaymentCheck::Repeat => NewPayment::Repeat,
        })
    }

    /// Checks a **fair settlement**: a payment the client signs to close the channel at
    /// what was metered instead of at the best payment. Every rule of
    /// [`check_payment`](Self::check_payment) applies except that it need not pay more than
    /// the best, and the close margin does not apply (a settlement is not a new payment); it
    /// must pay the server at least `spent` rounded up to the satoshi (and never less than the
    /// server output's dust threshold). The server stores it in place of the best in the same
    /// atomic step that moves the channel to closing, so nothing more can be debited
    /// ([`ChannelStore::close_with`](crate::store::ChannelStore::close_with)).
    ///
    /// # Errors
    ///
    /// As [`check_payment`](Self::check_payment), and [`PaymentError::BelowSpent`].
    pub fn check_fair_payment(
        &self,
        payment: Transaction,
        spent: crate::MilliSats,
    ) -> Result<CheckedPayment, PaymentError> {
        // No close margin for a settlement: checked as at a tip before any expiry.
        let genesis = ChainTip { height: 0, median_time_past: 0 };
        let _increase = self.check_payment(None, &payment, genesis)?;
        let needed = spent.to_sat_ceil().max(self.params.min_server_amount());
        let found = server_amount(&payment);
        if found < needed {
            return Err(PaymentError::BelowSpent { needed, found });
        }
        Ok(CheckedPayment::new(payment))
    }

    /// Checks a client-signed payment (server side, seed step 9) against the channel and its
    /// best payment so far.
    ///
    /// The payment must have exactly one input, with an empty scriptSig (BIP-0143 signatures
    /// do not commit to it, and a witness spend with one is invalid in every block). A payment
    /// byte-identical to `best` is then a [`PaymentCheck::Repeat`] without further checks.
    /// Otherwise, in order: the input spends the funding outpoint; version 2; final
    /// sequence; lock time 0; one or two outputs, server first, exactly the agreed scripts;
    /// the channel not within its close margin at `tip`; no value creation; no dust outputs,
    /// and change omitted only when it would be dust; fee within the agreed rates at the
    /// co-signed size (no upper bound when the change was omitted: the dust went to the fee);
    /// a server amount strictly above `best`'s (the same transaction is a repeat); a witness
    /// of exactly the client's signature, which must be strict DER, low-S, exactly
    /// `SIGHASH_ALL` and valid for the client key over the BIP-0143 sighash with the channel
    /// value.
    ///
    /// # Errors
    ///
    /// The first failed check as a [`PaymentError`].
    pub fn check_payment(
        &self,
        best: Option<&Transaction>,
        payment: &Transaction,
        tip: ChainTip,
    ) -> Result<PaymentCheck, PaymentError> {
        self.check_payment_with(best, payment, tip, &self.params.witness_script())
    }

    /// [`check_payment`](Self::check_payment), with the channel's witness script (built by
    /// the caller, or kept: [`PaymentChecker`]).
    fn check_payment_with(
        &self,
        best: Option<&Transaction>,
        payment: &Transaction,
        tip: ChainTip,
        witness_script: &Script,
    ) -> Result<PaymentCheck, PaymentError> {
        let [input] = payment.input.as_slice() else {
            return Err(PaymentError::InputCount { found: payment.input.len() });
        };
        // Checked before the repeat shortcut: a best payment stored with a scriptSig (by an
        // earlier version) must not keep serving.
        if !input.script_sig.is_empty() {
            return Err(PaymentError::ScriptSig);
        }
        if best == Some(payment) {
            return Ok(PaymentCheck::Repeat);
        }
        let (server, change) = self.check_form(input, payment)?;
        if self.params.is_closing(tip) {
            return Err(PaymentError::Closing { expiry: self.params.expiry });
        }
        self.check_amounts(payment, server, change)?;
        let previous = best.map_or(Amount::ZERO, server_amount);
        // Only a payment that does not pay more can be a repeat: hash only then.
        let repeat = server.value <= previous
            && best.is_some_and(|best| best.compute_txid() == payment.compute_txid());
        if server.value <= previous && !repeat {
            return Err(PaymentError::NotAnIncrease { best: previous, found: server.value });
        }
        self.verify_signature_with(payment, witness_script)?;
        Ok(if repeat {
            PaymentCheck::Repeat
        } else {
            PaymentCheck::Increase { previous, server_amount: server.value }
        })
    }

    /// [`check_payment`](Self::check_payment)'s rules of form: the input spends the funding
    /// outpoint; version 2, final sequence, lock time 0; one or two outputs, server first,
    /// exactly the agreed scripts. Returns the server output and the change.
    fn check_form<'a>(
        &self,
        input: &TxIn,
        payment: &'a Transaction,
    ) -> Result<(&'a TxOut, Option<&'a TxOut>), PaymentError> {
        let params = &self.params;
        if input.previous_output != self.outpoint {
            return Err(PaymentError::WrongOutpoint { found: input.previous_output });
        }
        if payment.version != TX_VERSION {
            return Err(PaymentError::Version { found: payment.version.0 });
        }
        if input.sequence != Sequence::MAX {
            return Err(PaymentError::Sequence { found: input.sequence });
        }
        if payment.lock_time != LockTime::ZERO {
            return Err(PaymentError::LockTime { found: payment.lock_time });
        }
        let (server, change) = match payment.output.as_slice() {
            [server] => (server, None),
            [server, change] => (server, Some(change)),
            outputs => return Err(PaymentError::OutputCount { found: outputs.len() }),
        };
        if server.script_pubkey != params.server_script {
            return Err(PaymentError::WrongServerScript);
        }
        if change.is_some_and(|change| change.script_pubkey != params.client_script) {
            return Err(PaymentError::WrongChangeScript);
        }
        Ok((server, change))
    }

    /// [`check_payment`](Self::check_payment)'s rules of amounts: no value creation; no dust
    /// outputs, and change omitted only when it would be dust; the fee within the agreed
    /// rates at the co-signed size (no upper bound when the change was omitted).
    fn check_amounts(
        &self,
        payment: &Transaction,
        server: &TxOut,
        change: Option<&TxOut>,
    ) -> Result<(), PaymentError> {
        let params = &self.params;
        let change_value = change.map_or(Amount::ZERO, |change| change.value);
        let fee = server
            .value
            .checked_add(change_value)
            .and_then(|out| params.value.checked_sub(out))
            .ok_or(PaymentError::ValueCreation)?;
        let threshold = params.min_server_amount();
        if server.value < threshold {
            return Err(PaymentError::ServerOutputDust { value: server.value, threshold });
        }
        let threshold = params.min_change();
        if change.is_some() && change_value < threshold {
            return Err(PaymentError::ChangeDust { value: change_value, threshold });
        }
        // One or two outputs (`check_form`): their script lengths without an allocation.
        let lengths = [server.script_pubkey.len(), change.map_or(0, |c| c.script_pubkey.len())];
        let weight = funding_spend_weight(&lengths[..payment.output.len().min(2)]);
        let required = fee_at(params.min_fee_rate, weight);
        if fee < required {
            return Err(PaymentError::Fee(FeeOutOfBounds::TooLow { fee, required }));
        }
        if change.is_some() {
            let max = fee_at(params.max_fee_rate, weight);
            if fee > max {
                return Err(PaymentError::Fee(FeeOutOfBounds::TooHigh { fee, max }));
            }
        } else {
            let would_be = params
                .value
                .checked_sub(server.value)
                .and_then(|rest| rest.checked_sub(params.payment_fee(true)))
                .unwrap_or(Amount::ZERO);
            if would_be >= threshold {
                return Err(PaymentError::ChangeOmitted { would_be });
            }
        }
        Ok(())
    }

    /// Verifies only the client's signature of a payment (witness shape, encoding, validity).
    ///
    /// For a payment that passed every other rule of [`check_payment`](Self::check_payment)
    /// but pays less than the best — a request that raced a top-up — this proves the sender
    /// holds the client key, so the payment can identify the channel without changing it.
    ///
    /// # Errors
    ///
    /// [`PaymentError::InputCount`] without an input, [`PaymentError::ScriptSig`],
    /// [`PaymentError::WitnessShape`] or [`PaymentError::Signature`].
    pub fn verify_client_signature(&self, payment: &Transaction) -> Result<(), PaymentError> {
        self.verify_signature_with(payment, &self.params.witness_script())
    }

    /// [`verify_client_signature`](Self::verify_client_signature), with the channel's witness
    /// script.
    fn verify_signature_with(
        &self,
        payment: &Transaction,
        witness_script: &Script,
    ) -> Result<(), PaymentError> {
        let input = payment.input.first().ok_or(PaymentError::InputCount { found: 0 })?;
        if !input.script_sig.is_empty() {
            return Err(PaymentError::ScriptSig);
        }
        let witness = &input.witness;
        let (Some(client_sig), 1) = (witness.nth(0), witness.len()) else {
            return Err(PaymentError::WitnessShape { items: witness.len() });
        };
        let client_sig = sig::parse_sighash_all(client_sig).map_err(PaymentError::Signature)?;
        let msg = self
            .params
            .sighash_with(payment, witness_script)
            .ok_or(PaymentError::InputCount { found: 0 })?;
        sig::verify(&msg, &client_sig, &self.params.client_key).map_err(PaymentError::Signature)
    }

    /// Co-signs a payment the server accepted and returns the complete transaction that
    /// closes the channel (seed step 9): witness `[<empty>, sig, sig, witness_script]`, the
    /// signatures in the witness script's key order.
    ///
    /// # Errors
    ///
    /// [`CloseError`] if the key is not the channel's server key or the payment does not carry
    /// a standard client signature.
    pub fn close_transaction(
        &self,
        payment: &Transaction,
        server_secret: &SecretKey,
    ) -> Result<Transaction, CloseError> {
        let [client_sig] = payment
            .input
            .first()
            .map(|input| input.witness.to_vec())
            .unwrap_or_default()
            .try_into()
            .map_err(|items: Vec<Vec<u8>>| CloseError::WitnessShape { items: items.len() })?;
        let client_sig = sig::parse_sighash_all(&client_sig).map_err(CloseError::Signature)?;
        let server_sig = self
            .params
            .sign_input(payment, server_secret, &self.params.server_key)
            .map_err(|_| CloseError::WrongKey)?;
        Ok(self.params.with_witness(payment, &client_sig, &server_sig))
    }
}
