//! Bitcoin Core's `sendrawtransaction` errors, as Core and Esplora (which relays them) report
//! them, mapped to [`RejectReason`].

use super::RejectReason;

/// What a `sendrawtransaction` error means.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BroadcastError {
    /// The transaction is already in the mempool: success.
    AlreadyKnown,
    /// A typed rejection.
    Rejected(RejectReason),
    /// Not a verdict on the transaction (node warming up, wrong parameters, …).
    Other,
}

/// Maps a `sendrawtransaction` error code and message (Bitcoin Core's `RPCErrorCode` and
/// reject reasons).
pub(crate) fn map_broadcast_error(code: i64, message: &str) -> BroadcastError {
    let has = |needle: &str| message.contains(needle);
    BroadcastError::Rejected(match code {
        -27 => RejectReason::AlreadyConfirmed,
        -25 if has("max-fee-exceeded") || has("Fee exceeds maximum") => RejectReason::FeeTooHigh,
        -25 => RejectReason::MissingInputs,
        -26 | -22 => {
            if has("txn-already-in-mempool") || has("txn-already-known") {
                return BroadcastError::AlreadyKnown;
            } else if has("non-BIP68-final") {
                RejectReason::NonBip68Final
            } else if has("non-final") {
                RejectReason::NonFinal
            } else if has("min relay fee not met")
                || has("mempool min fee not met")
                || has("insufficient fee")
            {
                RejectReason::FeeTooLow
            } else if has("txn-mempool-conflict") {
                RejectReason::Conflict
            } else if has("bad-txns-in-belowout") {
                RejectReason::ValueCreation
            } else if has("bad-txns-inputs-missingorspent") || has("missing-inputs") {
                RejectReason::MissingInputs
            } else if has("non-mandatory-script-verify-flag") || has("mempool-script-verify-flag") {
                // A policy-only script flag (low-S, clean stack, …): non-standard, not invalid.
                // Core 30 renamed the reasons to mempool-/block-script-verify-flag-failed.
                RejectReason::NonStandard
            } else if has("script-verify-flag-failed") {
                RejectReason::ScriptFailure
            } else if code == -22 {
                RejectReason::Invalid
            } else {
                RejectReason::NonStandard
            }
        }
        _ => return BroadcastError::Other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_core_error_codes_and_reasons() {
        use BroadcastError::{AlreadyKnown, Other, Rejected};
        let cases = [
            (-26, "non-final", Rejected(RejectReason::NonFinal)),
            (-26, "non-BIP68-final", Rejected(RejectReason::NonBip68Final)),
            (-26, "min relay fee not met, 100 < 169", Rejected(RejectReason::FeeTooLow)),
            (-26, "mempool min fee not met, 100 < 300", Rejected(RejectReason::FeeTooLow)),
            (-26, "txn-mempool-conflict", Rejected(RejectReason::Conflict)),
            (-26, "dust", Rejected(RejectReason::NonStandard)),
            (-26, "scriptpubkey", Rejected(RejectReason::NonStandard)),
            (
                -26,
                "bad-txns-in-belowout, value in (0.001) < value out (0.002)",
                Rejected(RejectReason::ValueCreation),
            ),
            (
                -26,
                "mandatory-script-verify-flag-failed (Signature must be zero for failed CHECK(MULTI)SIG operation)",
                Rejected(RejectReason::ScriptFailure),
            ),
            (
                -26,
                "non-mandatory-script-verify-flag (Non-canonical signature: S value is unnecessarily high)",
                Rejected(RejectReason::NonStandard),
            ),
            (
                -26,
                "mempool-script-verify-flag-failed (Non-canonical DER signature)",
                Rejected(RejectReason::NonStandard),
            ),
            (
                -26,
                "block-script-verify-flag-failed (Script failed an OP_EQUALVERIFY operation)",
                Rejected(RejectReason::ScriptFailure),
            ),
            (-26, "txn-already-in-mempool", AlreadyKnown),
            (-27, "Transaction already in block chain", Rejected(RejectReason::AlreadyConfirmed)),
            (-25, "bad-txns-inputs-missingorspent", Rejected(RejectReason::MissingInputs)),
            (
                -25,
                "Fee exceeds maximum configured by user (e.g. -maxtxfee, maxfeerate)",
                Rejected(RejectReason::FeeTooHigh),
            ),
            (-22, "TX decode failed", Rejected(RejectReason::Invalid)),
            (-28, "Loading block index...", Other),
            (-1, "something else", Other),
        ];
        for (code, message, expected) in cases {
            assert_eq!(map_broadcast_error(code, message), expected, "{code} {message}");
        }
    }
}
