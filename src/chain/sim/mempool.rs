//! The mempool's acceptance rules and eviction.

use std::collections::HashSet;

use bitcoin::absolute::LockTime;
use bitcoin::{Amount, FeeRate, OutPoint, Sequence, Transaction, TxOut, Txid};

use super::MAX_FEE_RATE;
use super::state::{Coin, State};
use crate::chain::{ChainError, RejectReason, policy};

/// All consensus script flags libbitcoinconsensus knows (its `VERIFY_ALL`): P2SH, DERSIG,
/// NULLDUMMY, CHECKLOCKTIMEVERIFY, CHECKSEQUENCEVERIFY and WITNESS.
const VERIFY_ALL: u32 = 0x0E15;

/// BIP-0068 fields of `nSequence`, as Bitcoin Core names them.
const SEQUENCE_DISABLE_FLAG: u32 = 1 << 31;
const SEQUENCE_TYPE_FLAG: u32 = 1 << 22;
const SEQUENCE_LOCKTIME_MASK: u32 = 0x0000_ffff;

/// Takes `tx` into the mempool, whose minimum fee rate is `floor` for it, if it passes every
/// rule of the module docs; a transaction already in the mempool is accepted again.
pub(super) fn accept(
    state: &mut State,
    tx: &Transaction,
    floor: FeeRate,
) -> Result<Txid, ChainError> {
    let txid = tx.compute_txid();
    if state.mempool.iter().any(|m| m.compute_txid() == txid) {
        return Ok(txid);
    }
    if state.confirmed.contains_key(&txid) {
        return Err(ChainError::rejected(
            RejectReason::AlreadyConfirmed,
            "transaction already in block chain",
        ));
    }
    let coins = spent_coins(state, tx)?;
    let prevouts: Vec<TxOut> = coins.iter().map(|c| c.output.clone()).collect();
    let fee = sum(&prevouts)
        .zip(sum(&tx.output))
        .and_then(|(inputs, outputs)| inputs.checked_sub(outputs))
        .ok_or_else(|| ChainError::rejected(RejectReason::ValueCreation, "bad-txns-in-belowout"))?;
    let tip = state.tip();
    if !is_final(tx, tip.height + 1, tip.median_time_past) {
        return Err(ChainError::rejected(RejectReason::NonFinal, "non-final"));
    }
    if !sequence_locks_satisfied(state, tx, &coins) {
        return Err(ChainError::rejected(RejectReason::NonBip68Final, "non-BIP68-final"));
    }
    policy::check_standard(tx, &prevouts).map_err(|e| {
        let reason = match e {
            policy::PolicyError::FeeTooLow { .. } => RejectReason::FeeTooLow,
            _ => RejectReason::NonStandard,
        };
        ChainError::rejected(reason, format!("{}: {e}", e.code()))
    })?;
    check_fee(tx, fee, floor)?;
    let spent = |op: &OutPoint| {
        tx.input.iter().position(|i| i.previous_output == *op).map(|i| prevouts[i].clone())
    };
    tx.verify_with_flags(spent, VERIFY_ALL).map_err(|e| {
        ChainError::rejected(
            RejectReason::ScriptFailure,
            format!("mandatory-script-verify-flag-failed ({e})"),
        )
    })?;
    for input in &tx.input {
        state.mempool_spent.insert(input.previous_output);
    }
    for (vout, output) in tx.output.iter().enumerate() {
        let vout = u32::try_from(vout).expect("fewer than 2^32 outputs");
        state.coins.insert(OutPoint { txid, vout }, Coin { output: output.clone(), height: None });
    }
    state.mempool.push(tx.clone());
    state.fees.insert(txid, fee);
    Ok(txid)
}

/// The coins `tx` spends: refused if it spends none, one twice, one a mempool transaction
/// spends already, or one that does not exist.
fn spent_coins(state: &State, tx: &Transaction) -> Result<Vec<Coin>, ChainError> {
    let mut seen = HashSet::new();
    if tx.input.is_empty() || tx.output.is_empty() {
        return Err(ChainError::rejected(
            RejectReason::Invalid,
            "bad-txns-vin-empty or bad-txns-vout-empty",
        ));
    }
    if !tx.input.iter().all(|i| seen.insert(i.previous_output)) {
        return Err(ChainError::rejected(RejectReason::Invalid, "bad-txns-inputs-duplicate"));
    }
    let mut coins = Vec::with_capacity(tx.input.len());
    for input in &tx.input {
        if state.mempool_spent.contains(&input.previous_output) {
            return Err(ChainError::rejected(RejectReason::Conflict, "txn-mempool-conflict"));
        }
        let coin = state.coins.get(&input.previous_output).cloned().ok_or_else(|| {
            ChainError::rejected(RejectReason::MissingInputs, "bad-txns-inputs-missingorspent")
        })?;
        coins.push(coin);
    }
    Ok(coins)
}

/// Refuses a `fee` below the mempool minimum `floor` (when above the relay minimum) or
/// above Bitcoin Core's default `maxfeerate`.
fn check_fee(tx: &Transaction, fee: Amount, floor: FeeRate) -> Result<(), ChainError> {
    let min_fee = floor.fee_vb(tx.vsize() as u64).unwrap_or(Amount::MAX);
    if floor > policy::MIN_RELAY_FEE_RATE && fee < min_fee {
        return Err(ChainError::rejected(
            RejectReason::FeeTooLow,
            format!("mempool min fee not met, {} < {}", fee.to_sat(), min_fee.to_sat()),
        ));
    }
    let max_fee = MAX_FEE_RATE.fee_vb(tx.vsize() as u64).unwrap_or(Amount::MAX);
    if fee > max_fee {
        return Err(ChainError::rejected(RejectReason::FeeTooHigh, "max-fee-exceeded"));
    }
    Ok(())
}

/// Removes a mempool transaction and, first, its mempool descendants.
pub(super) fn evict(state: &mut State, txid: Txid) {
    let Some(position) = state.mempool.iter().position(|m| m.compute_txid() == txid) else {
        return;
    };
    let tx = state.mempool[position].clone();
    let children: Vec<Txid> = state
        .mempool
        .iter()
        .filter(|m| m.input.iter().any(|i| i.previous_output.txid == txid))
        .map(Transaction::compute_txid)
        .collect();
    for child in children {
        evict(state, child);
    }
    state.mempool.retain(|m| m.compute_txid() != txid);
    state.fees.remove(&txid);
    for input in &tx.input {
        state.mempool_spent.remove(&input.previous_output);
    }
    for vout in 0..tx.output.len() {
        let vout = u32::try_from(vout).expect("fewer than 2^32 outputs");
        state.coins.remove(&OutPoint { txid, vout });
    }
}

fn sum(outputs: &[TxOut]) -> Option<Amount> {
    outputs.iter().try_fold(Amount::ZERO, |acc, o| acc.checked_add(o.value))
}

/// Bitcoin Core's `IsFinalTx` for a block at `height` whose lock-time clock is `time`.
pub(super) fn is_final(tx: &Transaction, height: u32, time: u32) -> bool {
    let lock = tx.lock_time.to_consensus_u32();
    if lock == 0 {
        return true;
    }
    let now = if matches!(tx.lock_time, LockTime::Blocks(_)) { height } else { time };
    lock < now || tx.input.iter().all(|i| i.sequence == Sequence::MAX)
}

/// Bitcoin Core's `CalculateSequenceLocks` + `EvaluateSequenceLocks` for the next block.
fn sequence_locks_satisfied(state: &State, tx: &Transaction, coins: &[Coin]) -> bool {
    if tx.version.0 < 2 {
        return true;
    }
    let tip = state.tip();
    let next = tip.height + 1;
    let (mut min_height, mut min_time) = (-1i64, -1i64);
    for (input, coin) in tx.input.iter().zip(coins) {
        let seq = input.sequence.to_consensus_u32();
        if seq & SEQUENCE_DISABLE_FLAG != 0 {
            continue;
        }
        let coin_height = coin.height.unwrap_or(next);
        let value = i64::from(seq & SEQUENCE_LOCKTIME_MASK);
        if seq & SEQUENCE_TYPE_FLAG != 0 {
            let base = state.median_time_past(coin_height.saturating_sub(1).min(tip.height));
            min_time = min_time.max(i64::from(base) + (value << 9) - 1);
        } else {
            min_height = min_height.max(i64::from(coin_height) + value - 1);
        }
    }
    min_height < i64::from(next) && min_time < i64::from(tip.median_time_past)
}
