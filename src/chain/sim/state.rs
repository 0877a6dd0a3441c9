//! The simulated chain's state: blocks, coins and the mempool.

use std::collections::{HashMap, HashSet};

use bitcoin::{Amount, FeeRate, OutPoint, Transaction, TxOut, Txid};

use crate::channel::ChainTip;

#[derive(Debug, Clone)]
pub(super) struct Coin {
    pub(super) output: TxOut,
    /// Confirmation height; `None` while the creating transaction is in the mempool.
    pub(super) height: Option<u32>,
}

#[derive(Debug)]
pub(super) struct State {
    /// Block timestamps, indexed by height.
    pub(super) times: Vec<u32>,
    /// Unspent outputs, confirmed or created by mempool transactions.
    pub(super) coins: HashMap<OutPoint, Coin>,
    /// Outpoints spent by mempool transactions.
    pub(super) mempool_spent: HashSet<OutPoint>,
    /// Mempool transactions in arrival order.
    pub(super) mempool: Vec<Transaction>,
    /// The fee of every mempool transaction.
    pub(super) fees: HashMap<Txid, Amount>,
    /// The lowest ancestor-package fee rate a block takes.
    pub(super) block_min_fee_rate: FeeRate,
    /// The lowest fee rate the mempool takes a transaction (or a package) at.
    pub(super) mempool_min_fee_rate: FeeRate,
    /// Whether packages are accepted as packages (`submitpackage`).
    pub(super) package_relay: bool,
    /// Confirmed transactions and their heights.
    pub(super) confirmed: HashMap<Txid, (u32, Transaction)>,
    pub(super) fee_rate: FeeRate,
    pub(super) faucet_counter: u32,
}

impl State {
    pub(super) fn tip(&self) -> ChainTip {
        let height = u32::try_from(self.times.len() - 1).expect("fewer than 2^32 blocks");
        ChainTip { height, median_time_past: self.median_time_past(height) }
    }

    /// Bitcoin Core's `GetMedianTimePast`: the median of the last 11 block times.
    pub(super) fn median_time_past(&self, height: u32) -> u32 {
        let end = height as usize + 1;
        let mut times: Vec<u32> = self.times[end.saturating_sub(11)..end].to_vec();
        times.sort_unstable();
        times[times.len() / 2]
    }
}
