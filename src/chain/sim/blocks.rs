//! What the next block takes.

use std::collections::{HashMap, HashSet};

use bitcoin::{Amount, FeeRate, Transaction, Txid};

use super::mempool::is_final;
use super::state::State;

/// The transactions of the next block, parents before children: repeatedly the final
/// transaction whose not-yet-selected mempool ancestor package has the best fee rate, with
/// that package, while the rate reaches the block minimum.
pub(super) fn select(state: &State, height: u32, mtp: u32) -> Vec<Transaction> {
    let by_id: HashMap<Txid, &Transaction> =
        state.mempool.iter().map(|tx| (tx.compute_txid(), tx)).collect();
    let mut selected: HashSet<Txid> = HashSet::new();
    let mut block = Vec::new();
    loop {
        let mut best: Option<(FeeRate, Vec<Txid>)> = None;
        for tx in &state.mempool {
            let txid = tx.compute_txid();
            if selected.contains(&txid) {
                continue;
            }
            // The package: the transaction and its unselected mempool ancestors.
            let mut package = vec![txid];
            let mut index = 0;
            while index < package.len() {
                for input in &by_id[&package[index]].input {
                    let parent = input.previous_output.txid;
                    if by_id.contains_key(&parent)
                        && !selected.contains(&parent)
                        && !package.contains(&parent)
                    {
                        package.push(parent);
                    }
                }
                index += 1;
            }
            if !package.iter().all(|id| is_final(by_id[id], height, mtp)) {
                continue;
            }
            let fee: Amount = package.iter().filter_map(|id| state.fees.get(id)).copied().sum();
            let weight: bitcoin::Weight = package.iter().map(|id| by_id[id].weight()).sum();
            let rate = FeeRate::from_sat_per_kwu(fee.to_sat() * 1_000 / weight.to_wu().max(1));
            if best.as_ref().is_none_or(|(b, _)| rate > *b) {
                best = Some((rate, package));
            }
        }
        match best {
            Some((rate, package)) if rate >= state.block_min_fee_rate => {
                selected.extend(package.iter().copied());
            }
            _ => break,
        }
    }
    // Arrival order keeps parents before children.
    for tx in &state.mempool {
        if selected.contains(&tx.compute_txid()) {
            block.push(tx.clone());
        }
    }
    block
}
