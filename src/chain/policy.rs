//! Bitcoin Core's relay policy (standardness), the part that matters for this crate.
//!
//! A transaction can be consensus-valid and still be refused by every Bitcoin Core mempool.
//! [`check_standard`] mirrors the rules of Core's `IsStandardTx`, `AreInputsStandard`,
//! `IsWitnessStandard`, its dust and minimum-relay-fee checks, and the signature-encoding half
//! of its standard script flags (`STRICTENC`, `LOW_S`). The consensus library
//! (`bitcoinconsensus`) cannot check those flags — they are not in its flag set — which is why
//! this module exists. The simulated chain applies it to every transaction, so a transaction
//! the tests accept is one a default Bitcoin Core node relays.
//!
//! # Examples
//!
//! ```
//! use bitcoin::{Amount, OutPoint, ScriptBuf, Transaction, TxIn, TxOut, absolute, transaction};
//! use paychan::chain::policy::{PolicyError, check_standard};
//!
//! let dust = Transaction {
//!     version: transaction::Version::TWO,
//!     lock_time: absolute::LockTime::ZERO,
//!     input: vec![TxIn { previous_output: OutPoint::null(), ..TxIn::default() }],
//!     output: vec![TxOut {
//!         value: Amount::from_sat(1),
//!         script_pubkey: ScriptBuf::new_p2wsh(&bitcoin::WScriptHash::from_raw_hash(
//!             bitcoin::hashes::Hash::all_zeros(),
//!         )),
//!     }],
//! };
//! let spent = TxOut { value: Amount::from_sat(10_000), script_pubkey: ScriptBuf::new() };
//! assert!(matches!(check_standard(&dust, &[spent]), Err(PolicyError::Dust { index: 0, .. })));
//! ```

use core::fmt;

use bitcoin::opcodes::all::OP_CHECKMULTISIG;
use bitcoin::script::Instruction;
use bitcoin::{Amount, FeeRate, Script, Transaction, TxOut};

use crate::channel::sig::{self, SignatureError};

/// The minimum relay fee rate applied: 1 sat/vB, Bitcoin Core's `minrelaytxfee` default
/// before v29 (v29 lowered it to 0.1 sat/vB; 1 sat/vB is accepted by both).
pub const MIN_RELAY_FEE_RATE: FeeRate = FeeRate::from_sat_per_kwu(250);

/// Bitcoin Core's `MAX_STANDARD_TX_WEIGHT`.
pub const MAX_STANDARD_TX_WEIGHT: u64 = 400_000;

/// Bitcoin Core's `MAX_STANDARD_P2WSH_SCRIPT_SIZE`.
pub const MAX_STANDARD_P2WSH_SCRIPT_SIZE: usize = 3_600;

/// Bitcoin Core's `MAX_STANDARD_P2WSH_STACK_ITEMS`.
pub const MAX_STANDARD_P2WSH_STACK_ITEMS: usize = 100;

/// Bitcoin Core's `MAX_STANDARD_P2WSH_STACK_ITEM_SIZE`.
pub const MAX_STANDARD_P2WSH_STACK_ITEM_SIZE: usize = 80;

/// Bitcoin Core's `MAX_STANDARD_SCRIPTSIG_SIZE`.
pub const MAX_STANDARD_SCRIPTSIG_SIZE: usize = 1_650;

/// Bitcoin Core's default `-datacarriersize` (the whole OP_RETURN script, before v30).
pub const MAX_OP_RETURN_RELAY: usize = 83;

/// A relay-policy rule a transaction breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PolicyError {
    /// `prevouts` does not have one entry per input.
    PrevoutCount,
    /// The version is not 1, 2 or 3.
    Version {
        /// The version found.
        found: i32,
    },
    /// The weight exceeds [`MAX_STANDARD_TX_WEIGHT`].
    TxWeight {
        /// The weight found.
        weight: u64,
    },
    /// A script_sig is larger than [`MAX_STANDARD_SCRIPTSIG_SIZE`] or not push-only.
    ScriptSig {
        /// The input.
        input: usize,
    },
    /// An output script is not a standard type (or a second / oversized OP_RETURN).
    NonStandardOutput {
        /// The output.
        index: usize,
    },
    /// An output is below its dust threshold.
    Dust {
        /// The output.
        index: usize,
        /// Its value.
        value: Amount,
        /// Its dust threshold.
        threshold: Amount,
    },
    /// A witness breaks the P2WSH/P2WPKH witness size and shape limits.
    NonStandardWitness {
        /// The input.
        input: usize,
    },
    /// A signature is not strict DER, is high-S, or has an undefined sighash type.
    Signature {
        /// The input.
        input: usize,
        /// What is wrong with it.
        error: SignatureError,
    },
    /// The outputs are worth more than the inputs (or the sums overflow).
    ValueCreation,
    /// The fee is below [`MIN_RELAY_FEE_RATE`] at the transaction's virtual size.
    FeeTooLow {
        /// The fee.
        fee: Amount,
        /// The minimum.
        required: Amount,
    },
}

impl PolicyError {
    /// The stable, machine-readable name of the rule.
    pub fn code(&self) -> &'static str {
        match self {
            Self::PrevoutCount => "prevout-count",
            Self::Version { .. } => "version",
            Self::TxWeight { .. } => "tx-size",
            Self::ScriptSig { .. } => "scriptsig",
            Self::NonStandardOutput { .. } => "scriptpubkey",
            Self::Dust { .. } => "dust",
            Self::NonStandardWitness { .. } => "bad-witness-nonstandard",
            Self::Signature { .. } => "signature-encoding",
            Self::ValueCreation => "bad-txns-in-belowout",
            Self::FeeTooLow { .. } => "min-relay-fee-not-met",
        }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PrevoutCount => f.write_str("one spent output per input is required"),
            Self::Version { found } => write!(f, "version {found} is not standard"),
            Self::TxWeight { weight } => write!(f, "weight {weight} exceeds the standard maximum"),
            Self::ScriptSig { input } => write!(f, "input {input}: script_sig is not standard"),
            Self::NonStandardOutput { index } => {
                write!(f, "output {index}: script is not standard")
            }
            Self::Dust { index, value, threshold } => {
                write!(f, "output {index}: {value} is below the dust threshold {threshold}")
            }
            Self::NonStandardWitness { input } => {
                write!(f, "input {input}: witness is not standard")
            }
            Self::Signature { input, error } => write!(f, "input {input}: {error}"),
            Self::ValueCreation => f.write_str("outputs are worth more than inputs"),
            Self::FeeTooLow { fee, required } => {
                write!(f, "fee {fee} is below the minimum relay fee {required}")
            }
        }
    }
}

impl std::error::Error for PolicyError {}

/// Checks `tx` against the relay-policy rules above. `prevouts[i]` is the output spent by
/// `tx.input[i]`.
///
/// # Errors
///
/// The first rule broken, as a [`PolicyError`].
pub fn check_standard(tx: &Transaction, prevouts: &[TxOut]) -> Result<(), PolicyError> {
    if prevouts.len() != tx.input.len() {
        return Err(PolicyError::PrevoutCount);
    }
    if !(1..=3).contains(&tx.version.0) {
        return Err(PolicyError::Version { found: tx.version.0 });
    }
    let weight = tx.weight().to_wu();
    if weight > MAX_STANDARD_TX_WEIGHT {
        return Err(PolicyError::TxWeight { weight });
    }
    for (input, txin) in tx.input.iter().enumerate() {
        if txin.script_sig.len() > MAX_STANDARD_SCRIPTSIG_SIZE || !txin.script_sig.is_push_only() {
            return Err(PolicyError::ScriptSig { input });
        }
    }
    let mut op_returns = 0;
    for (index, out) in tx.output.iter().enumerate() {
        let script = &out.script_pubkey;
        if script.is_op_return() {
            op_returns += 1;
            if op_returns > 1 || script.len() > MAX_OP_RETURN_RELAY {
                return Err(PolicyError::NonStandardOutput { index });
            }
            continue;
        }
        if !crate::channel::is_standard_payout(script) {
            return Err(PolicyError::NonStandardOutput { index });
        }
        let threshold = script.minimal_non_dust();
        if out.value < threshold {
            return Err(PolicyError::Dust { index, value: out.value, threshold });
        }
    }
    for (input, (txin, prevout)) in tx.input.iter().zip(prevouts).enumerate() {
        check_witness(input, &txin.witness.to_vec(), &prevout.script_pubkey)?;
    }
    let sum =
        |outs: &[TxOut]| outs.iter().try_fold(Amount::ZERO, |acc, o| acc.checked_add(o.value));
    let total_in = sum(prevouts).ok_or(PolicyError::ValueCreation)?;
    let total_out = sum(&tx.output).ok_or(PolicyError::ValueCreation)?;
    let fee = total_in.checked_sub(total_out).ok_or(PolicyError::ValueCreation)?;
    let required = MIN_RELAY_FEE_RATE.fee_vb(tx.vsize() as u64).unwrap_or(Amount::MAX);
    if fee < required {
        return Err(PolicyError::FeeTooLow { fee, required });
    }
    Ok(())
}

/// Witness standardness and signature encoding for P2WPKH and P2WSH spends.
fn check_witness(input: usize, items: &[Vec<u8>], spent: &Script) -> Result<(), PolicyError> {
    let nonstandard = PolicyError::NonStandardWitness { input };
    let signature = |bytes: &[u8]| {
        sig::parse_standard(bytes)
            .map(|_| ())
            .map_err(|error| PolicyError::Signature { input, error })
    };
    if spent.is_p2wpkh() {
        let [sig_bytes, key] = items else { return Err(nonstandard) };
        if key.len() != 33 {
            return Err(nonstandard);
        }
        return signature(sig_bytes);
    }
    if spent.is_p2wsh() {
        let Some((script, stack)) = items.split_last() else { return Err(nonstandard) };
        if script.len() > MAX_STANDARD_P2WSH_SCRIPT_SIZE
            || stack.len() > MAX_STANDARD_P2WSH_STACK_ITEMS
            || stack.iter().any(|item| item.len() > MAX_STANDARD_P2WSH_STACK_ITEM_SIZE)
        {
            return Err(nonstandard);
        }
        if is_multisig(Script::from_bytes(script)) {
            // [<dummy>, <sig>..., <script>]: every signature must be standard; a failing
            // signature would have to be empty (NULLFAIL), which a valid spend never has.
            let Some((_dummy, sigs)) = stack.split_first() else { return Err(nonstandard) };
            for sig_bytes in sigs {
                signature(sig_bytes)?;
            }
        }
    }
    Ok(())
}

fn is_multisig(script: &Script) -> bool {
    matches!(
        script.instructions().last(),
        Some(Ok(Instruction::Op(op))) if op == OP_CHECKMULTISIG
    )
}

#[cfg(test)]
mod tests {
    use bitcoin::hashes::Hash;
    use bitcoin::secp256k1::{Message, Secp256k1, SecretKey};
    use bitcoin::sighash::{EcdsaSighashType, SighashCache};
    use bitcoin::{
        CompressedPublicKey, OutPoint, ScriptBuf, Sequence, TxIn, Txid, Witness, absolute,
        transaction,
    };

    use super::*;

    fn key() -> (SecretKey, CompressedPublicKey) {
        let secret = SecretKey::from_slice(&[3; 32]).unwrap();
        (secret, CompressedPublicKey(secret.public_key(&Secp256k1::new())))
    }

    fn coin() -> TxOut {
        TxOut {
            value: Amount::from_sat(50_000),
            script_pubkey: ScriptBuf::new_p2wpkh(&key().1.wpubkey_hash()),
        }
    }

    /// A signed P2WPKH spend of [`coin`] paying `value` to a P2WPKH output.
    fn spend(value: u64) -> Transaction {
        let mut tx = Transaction {
            version: transaction::Version::TWO,
            lock_time: absolute::LockTime::ZERO,
            input: vec![TxIn {
                previous_output: OutPoint { txid: Txid::all_zeros(), vout: 0 },
                script_sig: ScriptBuf::new(),
                sequence: Sequence::MAX,
                witness: Witness::new(),
            }],
            output: vec![TxOut {
                value: Amount::from_sat(value),
                script_pubkey: coin().script_pubkey,
            }],
        };
        sign(&mut tx);
        tx
    }

    fn sign(tx: &mut Transaction) {
        let (secret, public) = key();
        let sighash = SighashCache::new(&*tx)
            .p2wpkh_signature_hash(0, &coin().script_pubkey, coin().value, EcdsaSighashType::All)
            .unwrap();
        let signature = Secp256k1::new().sign_ecdsa(&Message::from(sighash), &secret);
        let signature =
            bitcoin::ecdsa::Signature { signature, sighash_type: EcdsaSighashType::All };
        tx.input[0].witness = Witness::p2wpkh(&signature, &public.0);
    }

    #[test]
    fn accepts_a_standard_spend() {
        assert_eq!(check_standard(&spend(49_000), &[coin()]), Ok(()));
    }

    #[test]
    fn refuses_each_rule_of_form() {
        let c = coin();
        assert_eq!(check_standard(&spend(49_000), &[]), Err(PolicyError::PrevoutCount));

        let mut v = spend(49_000);
        v.version = transaction::Version(4);
        sign(&mut v);
        assert_eq!(
            check_standard(&v, std::slice::from_ref(&c)),
            Err(PolicyError::Version { found: 4 })
        );

        let mut big = spend(1_000);
        big.output = vec![big.output[0].clone(); 12_000];
        assert!(matches!(
            check_standard(&big, std::slice::from_ref(&c)),
            Err(PolicyError::TxWeight { .. })
        ));

        let mut ss = spend(49_000);
        ss.input[0].script_sig = ScriptBuf::from_bytes(vec![0x76]); // OP_DUP: not push-only
        assert_eq!(
            check_standard(&ss, std::slice::from_ref(&c)),
            Err(PolicyError::ScriptSig { input: 0 })
        );

        let mut bare = spend(49_000);
        bare.output[0].script_pubkey = ScriptBuf::from_bytes(vec![0x51]); // OP_TRUE
        assert_eq!(
            check_standard(&bare, std::slice::from_ref(&c)),
            Err(PolicyError::NonStandardOutput { index: 0 })
        );

        let mut two_returns = spend(49_000);
        let op_return =
            TxOut { value: Amount::ZERO, script_pubkey: ScriptBuf::new_op_return([1u8; 4]) };
        two_returns.output.push(op_return.clone());
        assert_eq!(check_standard(&two_returns, std::slice::from_ref(&c)), Ok(()));
        two_returns.output.push(op_return);
        assert_eq!(
            check_standard(&two_returns, std::slice::from_ref(&c)),
            Err(PolicyError::NonStandardOutput { index: 2 })
        );
    }

    #[test]
    fn refuses_each_rule_of_amounts_and_witnesses() {
        let c = coin();
        assert_eq!(
            check_standard(&spend(293), std::slice::from_ref(&c)),
            Err(PolicyError::Dust {
                index: 0,
                value: Amount::from_sat(293),
                threshold: Amount::from_sat(294)
            })
        );
        assert_eq!(check_standard(&spend(294), std::slice::from_ref(&c)), Ok(()));

        let mut wit = spend(49_000);
        wit.input[0].witness.push([1u8]);
        assert_eq!(
            check_standard(&wit, std::slice::from_ref(&c)),
            Err(PolicyError::NonStandardWitness { input: 0 })
        );

        let mut high = spend(49_000);
        let items = high.input[0].witness.to_vec();
        let parsed = bitcoin::ecdsa::Signature::from_slice(&items[0]).unwrap();
        let flipped = crate::channel::sig::tests::high_s_twin(&parsed.signature);
        let mut bytes = flipped.serialize_der().to_vec();
        bytes.push(0x01);
        high.input[0].witness = Witness::from_slice(&[bytes, items[1].clone()]);
        assert_eq!(
            check_standard(&high, std::slice::from_ref(&c)),
            Err(PolicyError::Signature { input: 0, error: SignatureError::HighS })
        );

        assert_eq!(
            check_standard(&spend(50_001), std::slice::from_ref(&c)),
            Err(PolicyError::ValueCreation)
        );
        let vsize = spend(49_999).vsize() as u64;
        assert_eq!(
            check_standard(&spend(50_000 - vsize + 1), std::slice::from_ref(&c)),
            Err(PolicyError::FeeTooLow {
                fee: Amount::from_sat(vsize - 1),
                required: Amount::from_sat(vsize)
            })
        );
        assert_eq!(check_standard(&spend(50_000 - vsize), &[c]), Ok(()));
    }
}
