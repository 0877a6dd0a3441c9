use bitcoin::{Amount, OutPoint, ScriptBuf, Sequence, Transaction, TxIn, TxOut, Witness};

use super::error::{FeeOutOfBounds, FundingError};
use super::params::{TX_VERSION, fee_at};
use super::{ChannelParams, Terms};

impl ChannelParams {
    /// Builds the unsigned funding transaction (client side, seed step 2): spends `inputs`
    /// (which must all be segwit), pays the channel value to the funding script at output 0,
    /// then `change` if any. Returns the transaction and the funding outpoint.
    pub fn build_funding(
        &self,
        inputs: &[OutPoint],
        change: Option<TxOut>,
    ) -> (Transaction, OutPoint) {
        let mut output =
            vec![TxOut { value: self.value, script_pubkey: self.funding_script_pubkey() }];
        output.extend(change);
        let tx = Transaction {
            version: TX_VERSION,
            lock_time: bitcoin::absolute::LockTime::ZERO,
            input: inputs
                .iter()
                .map(|&previous_output| TxIn {
                    previous_output,
                    script_sig: ScriptBuf::new(),
                    sequence: Sequence::MAX,
                    witness: Witness::new(),
                })
                .collect(),
            output,
        };
        let outpoint = OutPoint { txid: tx.compute_txid(), vout: 0 };
        (tx, outpoint)
    }

    /// Checks the client's signed funding transaction before the server broadcasts it (seed
    /// step 6).
    ///
    /// `outpoint` is the funding outpoint the refund was signed against; `prevouts[i]` is the
    /// output spent by input `i` (from the chain backend or the client's PSBT). The checks:
    /// the txid is the one the refund spends; the output is the channel's P2WSH with exactly
    /// the agreed value, inside `terms`' bounds; every input carries a witness (segwit only, so
    /// the txid cannot be malleated); the fee rate
    /// (at the transaction's actual virtual size) is at least `terms.funding_min_fee_rate`.
    ///
    /// # Errors
    ///
    /// The first failed check as a [`FundingError`].
    pub fn check_funding(
        &self,
        terms: &Terms,
        outpoint: OutPoint,
        funding: &Transaction,
        prevouts: &[TxOut],
    ) -> Result<(), FundingError> {
        let found = funding.compute_txid();
        if found != outpoint.txid {
            return Err(FundingError::TxidMismatch { expected: outpoint.txid, found });
        }
        let output = usize::try_from(outpoint.vout)
            .ok()
            .and_then(|vout| funding.output.get(vout))
            .filter(|out| out.script_pubkey == self.funding_script_pubkey())
            .ok_or(FundingError::WrongOutputScript)?;
        if output.value != self.value {
            return Err(FundingError::WrongValue { expected: self.value, found: output.value });
        }
        if output.value < terms.min_value || output.value > terms.max_value {
            return Err(FundingError::ValueOutOfBounds {
                value: output.value,
                min: terms.min_value,
                max: terms.max_value,
            });
        }
        // A witness on every input: only segwit spends have a txid that nobody (not even a
        // miner) can change after the refund was signed against it.
        if let Some(input) = funding.input.iter().position(|i| i.witness.is_empty()) {
            return Err(FundingError::Unsigned { input });
        }
        if prevouts.len() != funding.input.len() {
            return Err(FundingError::PrevoutCount {
                inputs: funding.input.len(),
                prevouts: prevouts.len(),
            });
        }
        let total_in = sum(prevouts).ok_or(FundingError::ValueCreation)?;
        let total_out = sum(&funding.output).ok_or(FundingError::ValueCreation)?;
        let fee = total_in.checked_sub(total_out).ok_or(FundingError::ValueCreation)?;
        let required = fee_at(terms.funding_min_fee_rate, funding.weight());
        if fee < required {
            return Err(FundingError::Fee(FeeOutOfBounds::TooLow { fee, required }));
        }
        Ok(())
    }
}

fn sum(outputs: &[TxOut]) -> Option<Amount> {
    outputs.iter().try_fold(Amount::ZERO, |acc, out| acc.checked_add(out.value))
}
