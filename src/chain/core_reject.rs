//! Bitcoin Core's `sendrawtransaction` errors, as Core and Esplora (which relays them) report
//! them, mapped to [`RejectReason`].

use bitcoin::{Transaction, Txid};
use serde_json::Value;

use super::http::unavailable;
use super::{ChainError, RejectReason};

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
            } else if has("txn-mempool-conflict") || has("rejecting replacement") {
                // A conflict with a mempool transaction it may not replace (Core 28 and later
                // replace by fee: "insufficient fee, rejecting replacement …").
                RejectReason::Conflict
            } else if has("min relay fee not met")
                || has("mempool min fee not met")
                || has("insufficient fee")
            {
                RejectReason::FeeTooLow
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

/// Reads Bitcoin Core's `submitpackage` answer (as Core returns it, and as Esplora's
/// `POST /txs/package` relays it): `Ok(child)` if the package is in the mempool.
pub(crate) fn package_result(
    answer: &Value,
    parent: &Transaction,
    child: &Transaction,
) -> Result<Txid, ChainError> {
    // Core answers "success" or describes each transaction's fate; a failure of the whole
    // package (a package policy) comes with no per-transaction error at all.
    let message = answer.get("package_msg").and_then(Value::as_str).unwrap_or("no package_msg");
    if message == "success" {
        return Ok(child.compute_txid());
    }
    // `tx-results` is keyed by wtxid, in no order that says which is the parent: the parent's
    // error is the reason (a child refused with it only lacks its parent's outputs).
    let results = answer.get("tx-results").and_then(Value::as_object);
    let error_of = |wtxid: String| {
        results.and_then(|r| r.get(&wtxid)).and_then(|r| r.get("error")).and_then(Value::as_str)
    };
    let mut errors: Vec<&str> = error_of(parent.compute_wtxid().to_string()).into_iter().collect();
    errors.extend(error_of(child.compute_wtxid().to_string()));
    errors.extend(results.into_iter().flat_map(|results| {
        results.values().filter_map(|r| r.get("error").and_then(Value::as_str))
    }));
    let child = child.compute_txid();
    match errors.first() {
        None => Err(unavailable(format!("submitpackage: {message}"))),
        Some(message) => match map_broadcast_error(-26, message) {
            BroadcastError::AlreadyKnown => Ok(child),
            BroadcastError::Rejected(reason) => Err(ChainError::rejected(reason, *message)),
            BroadcastError::Other => Err(unavailable(format!("submitpackage: {message}"))),
        },
    }
}

/// Finds Core's error code and message in an error an Esplora server relays in its body:
/// `sendrawtransaction RPC error: {"code":-26,"message":"…"}` (electrs up to 2024, mempool's
/// fork) or `sendrawtransaction RPC error -26: …` (Blockstream's electrs since its error type
/// carries the code).
#[cfg_attr(not(feature = "esplora"), allow(dead_code))]
pub(crate) fn relayed_error(text: &str) -> Option<(i64, String)> {
    if let Some(core) = text.find('{').and_then(|i| serde_json::from_str::<Value>(&text[i..]).ok())
    {
        let code = core["code"].as_i64().unwrap_or(0);
        return Some((code, core["message"].as_str().unwrap_or(text).to_owned()));
    }
    let (_, rest) = text.split_once("RPC error ")?;
    let (code, message) = rest.split_once(": ")?;
    Some((code.trim().parse().ok()?, message.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two distinct transactions: (parent, child).
    fn pair() -> (Transaction, Transaction) {
        let tx = |lock: u32| Transaction {
            version: bitcoin::transaction::Version::TWO,
            lock_time: bitcoin::absolute::LockTime::from_consensus(lock),
            input: vec![],
            output: vec![],
        };
        (tx(1), tx(2))
    }

    /// A refused package names the parent's reason, whichever wtxid sorts first in
    /// `tx-results` (the real electrs run found MissingInputs or FeeTooLow by that order).
    #[test]
    fn a_refused_package_reports_the_parents_reason() {
        let (parent, child) = pair();
        let answer =
            |first: &Transaction, first_error: &str, second: &Transaction, second_error: &str| {
                let mut results = serde_json::Map::new();
                results.insert(
                    first.compute_wtxid().to_string(),
                    serde_json::json!({ "error": first_error }),
                );
                results.insert(
                    second.compute_wtxid().to_string(),
                    serde_json::json!({ "error": second_error }),
                );
                serde_json::json!({ "package_msg": "transaction failed", "tx-results": results })
            };
        for answer in [
            answer(
                &parent,
                "mempool min fee not met, 100 < 400",
                &child,
                "bad-txns-inputs-missingorspent",
            ),
            answer(
                &child,
                "bad-txns-inputs-missingorspent",
                &parent,
                "mempool min fee not met, 100 < 400",
            ),
        ] {
            let error = package_result(&answer, &parent, &child).unwrap_err();
            assert_eq!(error.reject_reason(), Some(RejectReason::FeeTooLow), "{answer}");
        }
        let success = serde_json::json!({ "package_msg": "success" });
        assert_eq!(package_result(&success, &parent, &child), Ok(child.compute_txid()));
    }

    #[test]
    fn reads_core_errors_relayed_by_esplora() {
        let old = r#"sendrawtransaction RPC error: {"code":-26,"message":"txn-mempool-conflict"}"#;
        assert_eq!(relayed_error(old), Some((-26, "txn-mempool-conflict".to_owned())));
        let new = "sendrawtransaction RPC error -27: Transaction already in block chain";
        assert_eq!(
            relayed_error(new),
            Some((-27, "Transaction already in block chain".to_owned()))
        );
        assert_eq!(relayed_error("Invalid hex string"), None);
    }

    #[test]
    fn maps_core_error_codes_and_reasons() {
        use BroadcastError::{AlreadyKnown, Other, Rejected};
        let cases = [
            (-26, "non-final", Rejected(RejectReason::NonFinal)),
            (-26, "non-BIP68-final", Rejected(RejectReason::NonBip68Final)),
            (-26, "min relay fee not met, 100 < 169", Rejected(RejectReason::FeeTooLow)),
            (-26, "mempool min fee not met, 100 < 300", Rejected(RejectReason::FeeTooLow)),
            (-26, "txn-mempool-conflict", Rejected(RejectReason::Conflict)),
            (
                -26,
                "insufficient fee, rejecting replacement 5f…, not enough additional fees to relay; 0.00000110 < 0.00000111",
                Rejected(RejectReason::Conflict),
            ),
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
