//! The typed failures of each protocol check. Every variant names one check and has a stable
//! machine-readable [`code`](PaymentError::code), which the HTTP layer turns into a problem
//! `type`.

use core::fmt;

use bitcoin::absolute::LockTime;
use bitcoin::{Amount, OutPoint, Sequence, Txid};

use super::sig::SignatureError;

/// An expiry outside the server's lifetime bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpiryOutOfBounds {
    /// The requested expiry.
    pub expiry: LockTime,
    /// The earliest acceptable expiry, in the same unit.
    pub earliest: u32,
    /// The latest acceptable expiry, in the same unit.
    pub latest: u32,
}

impl fmt::Display for ExpiryOutOfBounds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "expiry {} is outside the accepted range {}..={}",
            self.expiry, self.earliest, self.latest
        )
    }
}

macro_rules! error_codes {
    ($ty:ident { $($pat:pat => $code:literal,)* }) => {
        impl $ty {
            /// The stable, machine-readable name of the failed check.
            pub fn code(&self) -> &'static str {
                match self {
                    $($pat => $code,)*
                }
            }
        }
    };
}

/// A fee outside the agreed bounds at the transaction's size (co-signed size for the refund
/// and the payment, signed size for the funding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FeeOutOfBounds {
    /// The fee is below the agreed minimum.
    TooLow {
        /// The transaction's fee.
        fee: Amount,
        /// The minimum fee.
        required: Amount,
    },
    /// The fee is above the agreed maximum.
    TooHigh {
        /// The transaction's fee.
        fee: Amount,
        /// The maximum fee.
        max: Amount,
    },
}

impl fmt::Display for FeeOutOfBounds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLow { fee, required } => {
                write!(f, "fee {fee} is below the minimum {required}")
            }
            Self::TooHigh { fee, max } => write!(f, "fee {fee} is above the maximum {max}"),
        }
    }
}

impl std::error::Error for FeeOutOfBounds {}

/// Why the server refused to open a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OpenError {
    /// The client key equals the server key.
    SameKeys,
    /// The channel value is outside the server's bounds (or too small to pay anything).
    ValueOutOfBounds {
        /// Requested value.
        value: Amount,
        /// Smallest accepted value.
        min: Amount,
        /// Largest accepted value.
        max: Amount,
    },
    /// The expiry is outside the server's lifetime bounds.
    Expiry(ExpiryOutOfBounds),
    /// The client's refund/change script is not a standard output type.
    NonStandardClientScript,
    /// The server's payout script is not a standard output type.
    NonStandardServerScript,
}

error_codes!(OpenError {
    Self::SameKeys => "same-keys",
    Self::ValueOutOfBounds { .. } => "value-out-of-bounds",
    Self::Expiry(_) => "expiry-out-of-bounds",
    Self::NonStandardClientScript => "non-standard-client-script",
    Self::NonStandardServerScript => "non-standard-server-script",
});

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SameKeys => f.write_str("client and server keys are the same"),
            Self::ValueOutOfBounds { value, min, max } => {
                write!(f, "channel value {value} is outside {min}..={max} or cannot pay dust")
            }
            Self::Expiry(e) => e.fmt(f),
            Self::NonStandardClientScript => f.write_str("client script is not a standard output"),
            Self::NonStandardServerScript => f.write_str("server script is not a standard output"),
        }
    }
}

impl std::error::Error for OpenError {}

/// Why the server refused to sign a refund transaction (T2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefundError {
    /// The refund has other than exactly one input.
    InputCount {
        /// Inputs found.
        found: usize,
    },
    /// The refund does not spend an output of the given funding transaction.
    WrongFundingTxid {
        /// The funding transaction's txid.
        expected: Txid,
        /// The txid the refund spends.
        found: Txid,
    },
    /// The spent funding output does not exist or is not the channel's P2WSH script.
    WrongFundingScript {
        /// The outpoint the refund spends.
        outpoint: OutPoint,
    },
    /// The funding output's value is not the agreed channel value.
    WrongFundingValue {
        /// The agreed value.
        expected: Amount,
        /// The funding output's value.
        found: Amount,
    },
    /// The refund's version is not 2.
    Version {
        /// The version found.
        found: i32,
    },
    /// The refund has other than exactly one output.
    OutputCount {
        /// Outputs found.
        found: usize,
    },
    /// The refund output does not pay the client's agreed script.
    WrongOutputScript,
    /// The input's sequence is final (`0xffffffff`), which would disable the lock time.
    FinalSequence,
    /// The lock time is not the agreed expiry.
    WrongLockTime {
        /// The agreed expiry.
        expected: LockTime,
        /// The refund's lock time.
        found: LockTime,
    },
    /// The agreed expiry is (no longer) within the server's lifetime bounds.
    Expiry(ExpiryOutOfBounds),
    /// The refund pays more than the channel holds.
    ValueCreation,
    /// The refund output is below its dust threshold.
    DustOutput {
        /// Output value.
        value: Amount,
        /// Dust threshold of its script.
        threshold: Amount,
    },
    /// The refund's fee is outside the agreed bounds at its co-signed size.
    Fee(FeeOutOfBounds),
    /// The refund input carries a scriptSig (a witness spend must have none).
    ScriptSig,
    /// The funding transaction is a coinbase (a client that mines): its output could not be
    /// spent for 100 blocks, so the server might not close before the refund is valid, and
    /// it vanishes if its block is reorganised away.
    CoinbaseFunding,
}

error_codes!(RefundError {
    Self::InputCount { .. } => "refund-input-count",
    Self::WrongFundingTxid { .. } => "refund-wrong-funding-txid",
    Self::WrongFundingScript { .. } => "refund-wrong-funding-script",
    Self::WrongFundingValue { .. } => "refund-wrong-funding-value",
    Self::Version { .. } => "refund-version",
    Self::OutputCount { .. } => "refund-output-count",
    Self::WrongOutputScript => "refund-wrong-output-script",
    Self::FinalSequence => "refund-final-sequence",
    Self::WrongLockTime { .. } => "refund-wrong-lock-time",
    Self::Expiry(_) => "refund-expiry-out-of-bounds",
    Self::ValueCreation => "refund-value-creation",
    Self::DustOutput { .. } => "refund-dust-output",
    Self::Fee(FeeOutOfBounds::TooLow { .. }) => "refund-fee-too-low",
    Self::Fee(FeeOutOfBounds::TooHigh { .. }) => "refund-fee-too-high",
    Self::ScriptSig => "refund-script-sig",
    Self::CoinbaseFunding => "refund-coinbase-funding",
});

impl fmt::Display for RefundError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InputCount { found } => write!(f, "refund has {found} inputs, expected 1"),
            Self::CoinbaseFunding => f.write_str("the funding transaction is a coinbase"),
            Self::WrongFundingTxid { expected, found } => {
                write!(f, "refund spends {found}, not the funding transaction {expected}")
            }
            Self::WrongFundingScript { outpoint } => {
                write!(f, "funding output {outpoint} is missing or not the channel's P2WSH")
            }
            Self::WrongFundingValue { expected, found } => {
                write!(f, "funding output holds {found}, agreed {expected}")
            }
            Self::Version { found } => write!(f, "refund version {found}, expected 2"),
            Self::OutputCount { found } => write!(f, "refund has {found} outputs, expected 1"),
            Self::WrongOutputScript => f.write_str("refund does not pay the agreed client script"),
            Self::FinalSequence => f.write_str("refund input sequence is final: lock time ignored"),
            Self::WrongLockTime { expected, found } => {
                write!(f, "refund lock time {found}, agreed expiry {expected}")
            }
            Self::Expiry(e) => e.fmt(f),
            Self::ValueCreation => f.write_str("refund pays more than the channel holds"),
            Self::DustOutput { value, threshold } => {
                write!(f, "refund output {value} is below the dust threshold {threshold}")
            }
            Self::Fee(e) => write!(f, "refund {e}"),
            Self::ScriptSig => {
                f.write_str("refund input has a scriptSig: a witness spend must have none")
            }
        }
    }
}

impl std::error::Error for RefundError {}

/// Why the server refused a signed funding transaction (T1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FundingError {
    /// The txid differs from the one the refund was signed against.
    TxidMismatch {
        /// The txid the refund spends.
        expected: Txid,
        /// The funding transaction's txid.
        found: Txid,
    },
    /// The output at the channel's vout is missing or not the channel's P2WSH script.
    WrongOutputScript,
    /// The funding output's value is not the agreed channel value.
    WrongValue {
        /// Agreed value.
        expected: Amount,
        /// Value found.
        found: Amount,
    },
    /// The value is outside the server's channel size bounds.
    ValueOutOfBounds {
        /// Value found.
        value: Amount,
        /// Smallest accepted.
        min: Amount,
        /// Largest accepted.
        max: Amount,
    },
    /// An input carries no witness: a funding spends segwit outputs only, so that its txid
    /// cannot change once the refund is signed against it.
    Unsigned {
        /// Index of the input.
        input: usize,
    },
    /// The number of spent outputs supplied does not match the inputs.
    PrevoutCount {
        /// Inputs.
        inputs: usize,
        /// Spent outputs supplied.
        prevouts: usize,
    },
    /// The outputs are worth more than the spent outputs.
    ValueCreation,
    /// The fee is below the server's floor at the transaction's size.
    Fee(FeeOutOfBounds),
}

error_codes!(FundingError {
    Self::TxidMismatch { .. } => "funding-txid-mismatch",
    Self::WrongOutputScript => "funding-wrong-output-script",
    Self::WrongValue { .. } => "funding-wrong-value",
    Self::ValueOutOfBounds { .. } => "funding-value-out-of-bounds",
    Self::Unsigned { .. } => "funding-unsigned",
    Self::PrevoutCount { .. } => "funding-prevout-count",
    Self::ValueCreation => "funding-value-creation",
    Self::Fee(FeeOutOfBounds::TooLow { .. }) => "funding-fee-too-low",
    Self::Fee(FeeOutOfBounds::TooHigh { .. }) => "funding-fee-too-high",
});

impl fmt::Display for FundingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TxidMismatch { expected, found } => {
                write!(f, "funding txid {found} is not the {expected} the refund was signed for")
            }
            Self::WrongOutputScript => f.write_str("funding output is not the channel's P2WSH"),
            Self::WrongValue { expected, found } => {
                write!(f, "funding output holds {found}, agreed {expected}")
            }
            Self::ValueOutOfBounds { value, min, max } => {
                write!(f, "funding value {value} is outside {min}..={max}")
            }
            Self::Unsigned { input } => {
                write!(f, "funding input {input} has no witness (segwit inputs only)")
            }
            Self::PrevoutCount { inputs, prevouts } => {
                write!(f, "{prevouts} spent outputs supplied for {inputs} inputs")
            }
            Self::ValueCreation => f.write_str("funding outputs exceed its inputs"),
            Self::Fee(e) => write!(f, "funding {e}"),
        }
    }
}

impl std::error::Error for FundingError {}

/// Why the server refused a payment transaction (T3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PaymentError {
    /// The payment has other than exactly one input.
    InputCount {
        /// Inputs found.
        found: usize,
    },
    /// The input does not spend the channel's funding outpoint.
    WrongOutpoint {
        /// The outpoint spent.
        found: OutPoint,
    },
    /// The version is not 2.
    Version {
        /// The version found.
        found: i32,
    },
    /// The input's sequence is not final (`0xffffffff`).
    Sequence {
        /// The sequence found.
        found: Sequence,
    },
    /// The lock time is not 0.
    LockTime {
        /// The lock time found.
        found: LockTime,
    },
    /// The payment has other than one or two outputs.
    OutputCount {
        /// Outputs found.
        found: usize,
    },
    /// Output 0 does not pay the server's agreed script.
    WrongServerScript,
    /// Output 1 does not pay the client's agreed script.
    WrongChangeScript,
    /// The outputs are worth more than the channel holds.
    ValueCreation,
    /// The server output is below its dust threshold.
    ServerOutputDust {
        /// Output value.
        value: Amount,
        /// Dust threshold.
        threshold: Amount,
    },
    /// The change output is below its dust threshold (omit it instead).
    ChangeDust {
        /// Output value.
        value: Amount,
        /// Dust threshold.
        threshold: Amount,
    },
    /// The change was omitted although it would not have been dust.
    ChangeOmitted {
        /// What the change would have been at the minimum fee.
        would_be: Amount,
    },
    /// The fee is outside the agreed bounds at the co-signed size.
    Fee(FeeOutOfBounds),
    /// The payment does not pay the server more than the best payment so far.
    NotAnIncrease {
        /// The server amount of the best payment so far.
        best: Amount,
        /// The server amount of this payment.
        found: Amount,
    },
    /// The witness is not exactly one item, the client's signature.
    WitnessShape {
        /// Witness items found.
        items: usize,
    },
    /// The client's signature is malformed, not `SIGHASH_ALL`, or does not verify.
    Signature(SignatureError),
    /// The channel is within its close margin: no new payments; open a new channel.
    Closing {
        /// The channel's expiry.
        expiry: LockTime,
    },
    /// A fair settlement that pays the server less than the channel's metered amount.
    BelowSpent {
        /// What the server spent, rounded up to the satoshi (at least its dust threshold).
        needed: Amount,
        /// What the payment pays the server.
        found: Amount,
    },
    /// The input carries a scriptSig. BIP-0143 signatures do not commit to it, but a
    /// witness-program spend with a non-empty scriptSig is invalid in every block, so the
    /// co-signed close could never be mined.
    ScriptSig,
}

error_codes!(PaymentError {
    Self::InputCount { .. } => "payment-input-count",
    Self::WrongOutpoint { .. } => "payment-wrong-outpoint",
    Self::Version { .. } => "payment-version",
    Self::Sequence { .. } => "payment-sequence",
    Self::LockTime { .. } => "payment-lock-time",
    Self::OutputCount { .. } => "payment-output-count",
    Self::WrongServerScript => "payment-wrong-server-script",
    Self::WrongChangeScript => "payment-wrong-change-script",
    Self::ValueCreation => "payment-value-creation",
    Self::ServerOutputDust { .. } => "payment-server-output-dust",
    Self::ChangeDust { .. } => "payment-change-dust",
    Self::ChangeOmitted { .. } => "payment-change-omitted",
    Self::Fee(FeeOutOfBounds::TooLow { .. }) => "payment-fee-too-low",
    Self::Fee(FeeOutOfBounds::TooHigh { .. }) => "payment-fee-too-high",
    Self::NotAnIncrease { .. } => "payment-not-an-increase",
    Self::WitnessShape { .. } => "payment-witness-shape",
    Self::Signature(_) => "payment-signature",
    Self::Closing { .. } => "payment-channel-closing",
    Self::ScriptSig => "payment-script-sig",
    Self::BelowSpent { .. } => "payment-below-spent",
});

impl fmt::Display for PaymentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InputCount { found } => write!(f, "payment has {found} inputs, expected 1"),
            Self::WrongOutpoint { found } => write!(f, "payment spends {found}, not the channel"),
            Self::Version { found } => write!(f, "payment version {found}, expected 2"),
            Self::Sequence { found } => write!(f, "payment sequence {found}, expected 0xffffffff"),
            Self::LockTime { found } => write!(f, "payment lock time {found}, expected 0"),
            Self::OutputCount { found } => {
                write!(f, "payment has {found} outputs, expected 1 or 2")
            }
            Self::WrongServerScript => f.write_str("output 0 does not pay the server's script"),
            Self::WrongChangeScript => f.write_str("output 1 does not pay the client's script"),
            Self::ValueCreation => f.write_str("payment outputs exceed the channel value"),
            Self::ServerOutputDust { value, threshold } => {
                write!(f, "server output {value} is below the dust threshold {threshold}")
            }
            Self::ChangeDust { value, threshold } => {
                write!(f, "change {value} is below the dust threshold {threshold}: omit it")
            }
            Self::ChangeOmitted { would_be } => {
                write!(f, "change of {would_be} is not dust and may not be omitted")
            }
            Self::Fee(e) => write!(f, "payment {e}"),
            Self::NotAnIncrease { best, found } => {
                write!(f, "payment of {found} to the server does not exceed the best {best}")
            }
            Self::WitnessShape { items } => {
                write!(f, "payment witness has {items} items, expected the client signature only")
            }
            Self::Signature(e) => write!(f, "client signature: {e}"),
            Self::Closing { expiry } => {
                write!(f, "channel expiring at {expiry} is closing; open a new channel")
            }
            Self::ScriptSig => {
                f.write_str("payment input has a scriptSig: a witness spend must have none")
            }
            Self::BelowSpent { needed, found } => {
                write!(f, "a settlement of {found} is below the {needed} the channel spent")
            }
        }
    }
}

impl std::error::Error for PaymentError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Signature(e) => Some(e),
            _ => None,
        }
    }
}

/// Why a transaction could not be signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SignError {
    /// The secret key does not belong to the public key the input must be signed for.
    WrongKey,
    /// The transaction has no input 0 to sign.
    NoInput,
}

impl fmt::Display for SignError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::WrongKey => f.write_str("the secret key does not match the channel's public key"),
            Self::NoInput => f.write_str("the transaction has no input to sign"),
        }
    }
}

impl std::error::Error for SignError {}

/// Why the server could not co-sign a payment into a closing transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseError {
    /// The secret key is not the channel's server key.
    WrongKey,
    /// The payment's witness is not exactly the client's signature.
    WitnessShape {
        /// Witness items found.
        items: usize,
    },
    /// The client's signature is not a standard `SIGHASH_ALL` signature.
    Signature(SignatureError),
    /// The channel has no payment to close with.
    NoPayment,
}

impl fmt::Display for CloseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoPayment => f.write_str("the channel has no payment to close with"),
            Self::WrongKey => f.write_str("the secret key is not the channel's server key"),
            Self::WitnessShape { items } => {
                write!(f, "payment witness has {items} items, expected the client signature")
            }
            Self::Signature(e) => write!(f, "client signature: {e}"),
        }
    }
}

impl std::error::Error for CloseError {}
