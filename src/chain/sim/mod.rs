//! An in-process **simulated** chain for tests and demos. Not a node: no proof of work, no
//! peers, no reorganisations.
//!
//! What it does check is what matters for payment channels: [`SimulatedChain::submit`]
//! refuses malformed transactions, missing or already-spent inputs, mempool conflicts (no
//! replace-by-fee), value creation, non-final transactions (absolute lock time against the
//! next block's height and the tip's median time past, as Bitcoin Core's `IsFinalTx` with
//! BIP-0113), unmet BIP-0068 relative lock times, any [relay-policy](super::policy) violation,
//! fees above Bitcoin Core's default `maxfeerate`, and — last — any input that Bitcoin Core's
//! consensus interpreter (`bitcoinconsensus`, all consensus flags) rejects.
//!
//! Blocks are made by [`mine`](SimulatedChain::mine), 600 seconds apart; coins are created
//! by the [faucet](SimulatedChain::faucet), already confirmed and spendable at once.
//!
//! # Examples
//!
//! ```
//! use bitcoin::secp256k1::{Secp256k1, SecretKey};
//! use bitcoin::{Amount, CompressedPublicKey};
//! use paychan::chain::TxStatus;
//! use paychan::chain::sim::SimulatedChain;
//!
//! let chain = SimulatedChain::new();
//! let key = CompressedPublicKey(SecretKey::from_slice(&[1; 32])?.public_key(&Secp256k1::new()));
//! let (outpoint, txout) = chain.faucet_p2wpkh(&key, Amount::from_sat(10_000));
//! assert_eq!(chain.utxo(&outpoint), Some(txout));
//! assert!(matches!(chain.tx_status(&outpoint.txid), TxStatus::Confirmed { confirmations: 1, .. }));
//! chain.mine(2);
//! assert!(matches!(chain.tx_status(&outpoint.txid), TxStatus::Confirmed { confirmations: 3, .. }));
//! # Ok::<(), bitcoin::secp256k1::Error>(())
//! ```

use std::collections::{HashMap, HashSet};
use std::future::{Future, ready};
use std::sync::{Arc, Mutex, MutexGuard};

use bitcoin::secp256k1::SecretKey;
use bitcoin::{
    Amount, CompressedPublicKey, FeeRate, OutPoint, Script, ScriptBuf, Sequence, Transaction, TxIn,
    TxOut, Txid, Witness, absolute, transaction,
};

use super::{ChainBackend, ChainError, ChainTip, RejectReason, TxStatus, Utxo, policy};

mod blocks;
mod mempool;
mod state;

use state::{Coin, State};

/// Height of the simulated chain's tip when it is created.
pub const START_HEIGHT: u32 = 200;

/// Timestamp of block 0; block `h` is stamped `GENESIS_TIME + 600·h`.
pub const GENESIS_TIME: u32 = 1_700_000_000;

/// Bitcoin Core's default `maxfeerate` for `sendrawtransaction`: 0.1 BTC/kvB.
pub const MAX_FEE_RATE: FeeRate = FeeRate::from_sat_per_kwu(2_500_000);

/// The simulated chain. Cloning it gives another handle to the same chain.
#[derive(Debug, Clone)]
pub struct SimulatedChain {
    state: Arc<Mutex<State>>,
}

impl Default for SimulatedChain {
    fn default() -> Self {
        Self::new()
    }
}

impl SimulatedChain {
    /// Creates a chain whose tip is at [`START_HEIGHT`], with a fee estimate of 2 sat/vB.
    pub fn new() -> Self {
        let times = (0..=START_HEIGHT).map(|h| GENESIS_TIME + 600 * h).collect();
        Self {
            state: Arc::new(Mutex::new(State {
                times,
                coins: HashMap::new(),
                mempool_spent: HashSet::new(),
                mempool: Vec::new(),
                fees: HashMap::new(),
                block_min_fee_rate: FeeRate::ZERO,
                mempool_min_fee_rate: policy::MIN_RELAY_FEE_RATE,
                package_relay: true,
                confirmed: HashMap::new(),
                fee_rate: FeeRate::from_sat_per_vb_u32(2),
                faucet_counter: 0,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent state (every write is last).
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Returns the tip's height and median time past.
    pub fn tip(&self) -> ChainTip {
        self.lock().tip()
    }

    /// Creates a confirmed output of `amount` to `script_pubkey`, spendable at once.
    pub fn faucet(&self, script_pubkey: ScriptBuf, amount: Amount) -> OutPoint {
        let mut state = self.lock();
        state.faucet_counter += 1;
        // A unique, never-validated transaction standing in for a coinbase.
        let tx = Transaction {
            version: transaction::Version::ONE,
            lock_time: absolute::LockTime::ZERO,
            input: vec![TxIn {
                previous_output: OutPoint::null(),
                script_sig: ScriptBuf::from_bytes(state.faucet_counter.to_le_bytes().to_vec()),
                sequence: Sequence::MAX,
                witness: Witness::new(),
            }],
            output: vec![TxOut { value: amount, script_pubkey }],
        };
        let txid = tx.compute_txid();
        let height = state.tip().height;
        let outpoint = OutPoint { txid, vout: 0 };
        state.coins.insert(outpoint, Coin { output: tx.output[0].clone(), height: Some(height) });
        state.confirmed.insert(txid, (height, tx));
        outpoint
    }

    /// Creates a confirmed P2WPKH output of `amount` to `key`; see [`faucet`](Self::faucet).
    pub fn faucet_p2wpkh(&self, key: &CompressedPublicKey, amount: Amount) -> (OutPoint, TxOut) {
        let script_pubkey = ScriptBuf::new_p2wpkh(&key.wpubkey_hash());
        let outpoint = self.faucet(script_pubkey.clone(), amount);
        (outpoint, TxOut { value: amount, script_pubkey })
    }

    /// Submits `tx` to the mempool: what [`ChainBackend::broadcast`] does, synchronously.
    ///
    /// # Errors
    ///
    /// [`ChainError::Rejected`] with the first failed check (see the [module docs](self)).
    pub fn submit(&self, tx: &Transaction) -> Result<Txid, ChainError> {
        let mut state = self.lock();
        let floor = state.mempool_min_fee_rate;
        mempool::accept(&mut state, tx, floor)
    }

    /// Submits `parent` and `child` as a package, as Bitcoin Core's `submitpackage`: each
    /// must pay the relay minimum, and together they must pay the
    /// [mempool minimum](Self::set_mempool_min_fee_rate) — the child's fee can carry a parent
    /// below it. Returns the child's txid.
    ///
    /// # Errors
    ///
    /// As [`submit`](Self::submit) for either transaction (nothing is accepted then), and
    /// [`RejectReason::FeeTooLow`] if the package pays less than the mempool minimum.
    pub fn submit_package(
        &self,
        parent: &Transaction,
        child: &Transaction,
    ) -> Result<Txid, ChainError> {
        let mut state = self.lock();
        let floor = state.mempool_min_fee_rate;
        let parent_id = parent.compute_txid();
        let parent_known = state.mempool.iter().any(|m| m.compute_txid() == parent_id);
        mempool::accept(&mut state, parent, policy::MIN_RELAY_FEE_RATE)?;
        // A parent already in the mempool is not part of the package: the child stands alone.
        let child_floor = if parent_known { floor } else { policy::MIN_RELAY_FEE_RATE };
        let child_result = mempool::accept(&mut state, child, child_floor);
        let ids = [parent_id, child.compute_txid()];
        let package_fee: Amount = ids.iter().filter_map(|id| state.fees.get(id)).copied().sum();
        let weight = parent.weight() + child.weight();
        let required = floor.fee_wu(weight).unwrap_or(Amount::MAX);
        let refused = match child_result {
            Err(error) => Some(error),
            Ok(_) if package_fee < required && !parent_known => Some(ChainError::rejected(
                RejectReason::FeeTooLow,
                format!(
                    "mempool min fee not met, {} < {}",
                    package_fee.to_sat(),
                    required.to_sat()
                ),
            )),
            Ok(_) => None,
        };
        match refused {
            Some(error) => {
                if !parent_known {
                    mempool::evict(&mut state, parent_id);
                }
                Err(error)
            }
            None => Ok(child.compute_txid()),
        }
    }

    /// Removes `txid` (and its descendants) from the mempool, as a node that restarted without
    /// its mempool or trimmed it: the inputs are unspent again, the outputs gone.
    pub fn drop_from_mempool(&self, txid: &Txid) {
        mempool::evict(&mut self.lock(), *txid);
    }

    /// Sets the lowest fee rate the mempool takes a transaction at (default
    /// [`policy::MIN_RELAY_FEE_RATE`]): a full mempool's rising minimum. Below it, a
    /// transaction is refused ([`RejectReason::FeeTooLow`]) unless a child carries it in a
    /// package ([`submit_package`](Self::submit_package)). What is already in the mempool stays.
    pub fn set_mempool_min_fee_rate(&self, rate: FeeRate) {
        self.lock().mempool_min_fee_rate = rate.max(policy::MIN_RELAY_FEE_RATE);
    }

    /// The mempool minimum (see [`set_mempool_min_fee_rate`](Self::set_mempool_min_fee_rate)).
    pub fn mempool_min_fee_rate(&self) -> FeeRate {
        self.lock().mempool_min_fee_rate
    }

    /// Whether [`broadcast_package`](ChainBackend::broadcast_package) submits packages as
    /// packages (default) or, as a backend without package relay, one by one.
    pub fn set_package_relay(&self, on: bool) {
        self.lock().package_relay = on;
    }

    /// Mines `n` blocks, 600 seconds apart. Each block takes the mempool transactions that are
    /// final for it and whose ancestor package (the transaction with its unconfirmed mempool
    /// ancestors, as Bitcoin Core's ancestor-score mining) pays at least the
    /// [block minimum fee rate](Self::set_block_min_fee_rate) — so a child paying for its
    /// parent (CPFP) confirms both. Returns the txids confirmed.
    pub fn mine(&self, n: u32) -> Vec<Txid> {
        let mut state = self.lock();
        let mut confirmed = Vec::new();
        for _ in 0..n {
            let height = state.tip().height + 1;
            let time = state.times.last().copied().unwrap_or(GENESIS_TIME) + 600;
            let mtp = state.tip().median_time_past;
            state.times.push(time);
            for tx in blocks::select(&state, height, mtp) {
                let txid = tx.compute_txid();
                state.mempool.retain(|m| m.compute_txid() != txid);
                state.fees.remove(&txid);
                for input in &tx.input {
                    state.mempool_spent.remove(&input.previous_output);
                    state.coins.remove(&input.previous_output);
                }
                for vout in 0..tx.output.len() {
                    let vout = u32::try_from(vout).expect("fewer than 2^32 outputs");
                    if let Some(coin) = state.coins.get_mut(&OutPoint { txid, vout }) {
                        coin.height = Some(height);
                    }
                }
                state.confirmed.insert(txid, (height, tx));
                confirmed.push(txid);
            }
        }
        confirmed
    }

    /// Sets the lowest fee rate a block takes (default zero: every final transaction). Raise
    /// it to leave low-fee transactions waiting in the mempool, as on a busy network.
    pub fn set_block_min_fee_rate(&self, rate: FeeRate) {
        self.lock().block_min_fee_rate = rate;
    }

    /// Mines one block containing `tx` although it conflicts with mempool transactions, as a
    /// miner that never saw them would: the conflicting transactions and their descendants
    /// leave the mempool (a double spend). `tx` must otherwise be valid.
    ///
    /// # Errors
    ///
    /// As [`submit`](Self::submit), after the conflicts were evicted.
    pub fn mine_double_spend(&self, tx: &Transaction) -> Result<Txid, ChainError> {
        {
            let mut state = self.lock();
            let conflicts: Vec<Txid> = state
                .mempool
                .iter()
                .filter(|m| {
                    m.input
                        .iter()
                        .any(|i| tx.input.iter().any(|t| t.previous_output == i.previous_output))
                })
                .map(Transaction::compute_txid)
                .collect();
            for txid in conflicts {
                mempool::evict(&mut state, txid);
            }
        }
        let txid = self.submit(tx)?;
        let rate = std::mem::replace(&mut self.lock().block_min_fee_rate, FeeRate::ZERO);
        self.mine(1);
        self.lock().block_min_fee_rate = rate;
        Ok(txid)
    }

    /// Reports where `txid` stands.
    pub fn tx_status(&self, txid: &Txid) -> TxStatus {
        let state = self.lock();
        if let Some((height, _)) = state.confirmed.get(txid) {
            let confirmations = state.tip().height - height + 1;
            return TxStatus::Confirmed { height: *height, confirmations };
        }
        if state.mempool.iter().any(|tx| tx.compute_txid() == *txid) {
            return TxStatus::InMempool;
        }
        TxStatus::Unknown
    }

    /// Returns the unspent output at `outpoint` (mempool outputs included, mempool spends
    /// excluded).
    pub fn utxo(&self, outpoint: &OutPoint) -> Option<TxOut> {
        let state = self.lock();
        if state.mempool_spent.contains(outpoint) {
            return None;
        }
        state.coins.get(outpoint).map(|coin| coin.output.clone())
    }

    /// Returns a transaction from the mempool or a block.
    pub fn get_transaction(&self, txid: &Txid) -> Option<Transaction> {
        let state = self.lock();
        state
            .confirmed
            .get(txid)
            .map(|(_, tx)| tx.clone())
            .or_else(|| state.mempool.iter().find(|tx| tx.compute_txid() == *txid).cloned())
    }

    /// Returns the txids in the mempool, in arrival order.
    pub fn mempool_txids(&self) -> Vec<Txid> {
        self.lock().mempool.iter().map(Transaction::compute_txid).collect()
    }

    /// Sets the fee rate [`estimate_fee_rate`](ChainBackend::estimate_fee_rate) answers.
    pub fn set_fee_rate(&self, rate: FeeRate) {
        self.lock().fee_rate = rate;
    }
}

impl ChainBackend for SimulatedChain {
    fn broadcast(&self, tx: &Transaction) -> impl Future<Output = Result<Txid, ChainError>> + Send {
        ready(self.submit(tx))
    }

    fn tx_status(&self, txid: &Txid) -> impl Future<Output = Result<TxStatus, ChainError>> + Send {
        ready(Ok(SimulatedChain::tx_status(self, txid)))
    }

    fn tip(&self) -> impl Future<Output = Result<ChainTip, ChainError>> + Send {
        ready(Ok(SimulatedChain::tip(self)))
    }

    fn estimate_fee_rate(
        &self,
        _target_blocks: u16,
    ) -> impl Future<Output = Result<FeeRate, ChainError>> + Send {
        // As Core's `estimatesmartfee`, never below the mempool minimum.
        let state = self.lock();
        ready(Ok(state.fee_rate.max(state.mempool_min_fee_rate)))
    }

    fn mempool_min_fee_rate(&self) -> impl Future<Output = Result<FeeRate, ChainError>> + Send {
        ready(Ok(SimulatedChain::mempool_min_fee_rate(self)))
    }

    /// Always [`Network::Regtest`](bitcoin::Network::Regtest): the simulated chain stands for
    /// a regtest node (the demo and the tests run it with regtest keys and addresses).
    fn network(&self) -> impl Future<Output = Result<bitcoin::Network, ChainError>> + Send {
        ready(Ok(bitcoin::Network::Regtest))
    }

    fn has_package_relay(&self) -> impl Future<Output = Result<bool, ChainError>> + Send {
        ready(Ok(self.lock().package_relay))
    }

    fn broadcast_package(
        &self,
        parent: &Transaction,
        child: &Transaction,
    ) -> impl Future<Output = Result<Txid, ChainError>> + Send {
        let package_relay = self.lock().package_relay;
        ready(if package_relay {
            self.submit_package(parent, child)
        } else {
            self.submit(parent).and_then(|_| self.submit(child))
        })
    }

    fn unspent(
        &self,
        outpoint: &OutPoint,
    ) -> impl Future<Output = Result<Option<Utxo>, ChainError>> + Send {
        let state = self.lock();
        let tip = state.tip().height;
        let utxo = state.coins.get(outpoint).filter(|_| !state.mempool_spent.contains(outpoint));
        ready(Ok(utxo.map(|coin| {
            Utxo::new(coin.output.clone(), coin.height.map_or(0, |height| tip - height + 1))
        })))
    }

    /// Every output paying `script` that is unspent, mempool included (as Esplora answers).
    fn unspent_outputs_of(
        &self,
        script: &Script,
    ) -> impl Future<Output = Result<Vec<(OutPoint, Utxo)>, ChainError>> + Send {
        let state = self.lock();
        let tip = state.tip().height;
        let mut found: Vec<_> = (state.coins.iter())
            .filter(|(outpoint, coin)| {
                coin.output.script_pubkey.as_script() == script
                    && !state.mempool_spent.contains(outpoint)
            })
            .map(|(outpoint, coin)| {
                let depth = coin.height.map_or(0, |height| tip - height + 1);
                (*outpoint, Utxo::new(coin.output.clone(), depth))
            })
            .collect();
        found.sort_by_key(|(outpoint, _)| *outpoint);
        ready(Ok(found))
    }
}

/// Signs P2WPKH input `input` of `tx`, which spends `prevout`, with `key` (`SIGHASH_ALL`): a
/// wallet stand-in for tests and demos.
///
/// # Panics
///
/// If `input` is out of range or `prevout` is not a P2WPKH output.
pub fn sign_p2wpkh_input(tx: &mut Transaction, input: usize, prevout: &TxOut, key: &SecretKey) {
    tx.input[input].witness = crate::channel::sig::p2wpkh_witness(tx, input, prevout, key)
        .expect("input in range and prevout is P2WPKH");
}

#[cfg(test)]
mod tests {
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use bitcoin::secp256k1::Secp256k1;

    use super::*;
    use bitcoin::absolute::LockTime;

    fn wallet() -> (SecretKey, CompressedPublicKey) {
        let secret = SecretKey::from_slice(&[5; 32]).unwrap();
        (secret, CompressedPublicKey(secret.public_key(&Secp256k1::new())))
    }

    /// A signed spend of `coin` paying `value` back to the wallet.
    fn spend(
        coin: (OutPoint, TxOut),
        value: u64,
        lock_time: u32,
        sequence: Sequence,
    ) -> Transaction {
        let mut tx = Transaction {
            version: transaction::Version::TWO,
            lock_time: LockTime::from_consensus(lock_time),
            input: vec![TxIn { previous_output: coin.0, sequence, ..TxIn::default() }],
            output: vec![TxOut {
                value: Amount::from_sat(value),
                script_pubkey: coin.1.script_pubkey.clone(),
            }],
        };
        sign_p2wpkh_input(&mut tx, 0, &coin.1, &wallet().0);
        tx
    }

    fn funded(chain: &SimulatedChain) -> (OutPoint, TxOut) {
        chain.faucet_p2wpkh(&wallet().1, Amount::from_sat(100_000))
    }

    fn reason(result: Result<Txid, ChainError>) -> RejectReason {
        result.expect_err("rejected").reject_reason().expect("a rejection")
    }

    #[test]
    fn a_child_pays_for_its_parent_above_the_block_minimum() {
        let chain = SimulatedChain::new();
        chain.set_block_min_fee_rate(FeeRate::from_sat_per_vb_u32(10));
        // The parent pays 1 000 sat for ~110 vB (9 sat/vB): below the minimum alone.
        let parent = spend(funded(&chain), 99_000, 0, Sequence::MAX);
        let parent_id = chain.submit(&parent).unwrap();
        chain.mine(1);
        assert_eq!(chain.tx_status(&parent_id), TxStatus::InMempool, "too cheap alone");
        // A child paying 200 sat is still too little for the package (~5.5 sat/vB).
        let coin = (OutPoint::new(parent_id, 0), parent.output[0].clone());
        let weak = spend(coin.clone(), 98_800, 0, Sequence::MAX);
        let weak_id = chain.submit(&weak).unwrap();
        chain.mine(1);
        assert_eq!(chain.tx_status(&parent_id), TxStatus::InMempool);
        // Replaced by a child paying 2 000 sat: the package reaches 10 sat/vB and both confirm.
        {
            let mut state = chain.lock();
            mempool::evict(&mut state, weak_id);
        }
        let strong = spend(coin, 97_000, 0, Sequence::MAX);
        let strong_id = chain.submit(&strong).unwrap();
        let mined = chain.mine(1);
        assert_eq!(mined, vec![parent_id, strong_id], "parent first, in one block");
    }

    #[test]
    fn a_miner_can_confirm_a_double_spend_of_a_mempool_transaction() {
        let chain = SimulatedChain::new();
        let coin = funded(&chain);
        let first = spend(coin.clone(), 99_000, 0, Sequence::MAX);
        let first_id = chain.submit(&first).unwrap();
        let child =
            spend((OutPoint::new(first_id, 0), first.output[0].clone()), 98_000, 0, Sequence::MAX);
        let child_id = chain.submit(&child).unwrap();
        let double = spend(coin, 98_500, 0, Sequence::MAX);
        assert_eq!(reason(chain.submit(&double)), RejectReason::Conflict, "the mempool refuses it");
        let double_id = chain.mine_double_spend(&double).unwrap();
        assert!(matches!(
            chain.tx_status(&double_id),
            TxStatus::Confirmed { confirmations: 1, .. }
        ));
        assert_eq!(chain.tx_status(&first_id), TxStatus::Unknown, "the first spend is gone");
        assert_eq!(chain.tx_status(&child_id), TxStatus::Unknown, "and its child with it");
        assert_eq!(chain.utxo(&OutPoint::new(first_id, 0)), None);
        assert!(chain.mempool_txids().is_empty());
    }

    #[test]
    fn spends_confirm_and_cannot_be_spent_twice() {
        let chain = SimulatedChain::new();
        let coin = funded(&chain);
        let tx = spend(coin.clone(), 99_000, 0, Sequence::MAX);
        let txid = chain.submit(&tx).unwrap();
        assert_eq!(chain.submit(&tx), Ok(txid), "resubmitting is idempotent");
        assert_eq!(chain.tx_status(&txid), TxStatus::InMempool);
        assert_eq!(chain.utxo(&coin.0), None);
        let double = spend(coin.clone(), 98_000, 0, Sequence::MAX);
        assert_eq!(reason(chain.submit(&double)), RejectReason::Conflict);
        assert_eq!(chain.mine(1), vec![txid]);
        assert_eq!(
            chain.tx_status(&txid),
            TxStatus::Confirmed { height: START_HEIGHT + 1, confirmations: 1 }
        );
        assert_eq!(reason(chain.submit(&double)), RejectReason::MissingInputs);
        assert_eq!(reason(chain.submit(&tx)), RejectReason::AlreadyConfirmed);
        // The new output is spendable.
        let child =
            spend((OutPoint { txid, vout: 0 }, tx.output[0].clone()), 98_000, 0, Sequence::MAX);
        assert!(chain.submit(&child).is_ok());
    }

    #[test]
    fn refuses_missing_inputs_value_creation_and_bad_scripts() {
        let chain = SimulatedChain::new();
        let coin = funded(&chain);
        let ghost = (OutPoint { vout: 1, ..coin.0 }, coin.1.clone());
        assert_eq!(
            reason(chain.submit(&spend(ghost, 1_000, 0, Sequence::MAX))),
            RejectReason::MissingInputs
        );
        assert_eq!(
            reason(chain.submit(&spend(coin.clone(), 100_001, 0, Sequence::MAX))),
            RejectReason::ValueCreation
        );
        // A valid-looking signature over the wrong amount: only the interpreter can tell.
        let mut wrong = spend(coin.clone(), 99_000, 0, Sequence::MAX);
        let lying = TxOut { value: Amount::from_sat(100_001), ..coin.1.clone() };
        sign_p2wpkh_input(&mut wrong, 0, &lying, &wallet().0);
        assert_eq!(reason(chain.submit(&wrong)), RejectReason::ScriptFailure);
        assert_eq!(
            reason(chain.submit(&spend(coin.clone(), 99_990, 0, Sequence::MAX))),
            RejectReason::FeeTooLow
        );
        assert_eq!(
            reason(chain.submit(&spend(coin.clone(), 100, 0, Sequence::MAX))),
            RejectReason::NonStandard
        );
        let whale = chain.faucet_p2wpkh(&wallet().1, Amount::from_sat(20_000_000));
        let greedy = spend(whale.clone(), 300, 0, Sequence::MAX);
        assert_eq!(reason(chain.submit(&greedy)), RejectReason::FeeTooHigh);
        let max = MAX_FEE_RATE.fee_vb(greedy.vsize() as u64).unwrap();
        assert!(
            chain
                .submit(&spend(
                    whale,
                    (Amount::from_sat(20_000_000) - max).to_sat(),
                    0,
                    Sequence::MAX
                ))
                .is_ok()
        );
        assert!(chain.submit(&spend(coin, 99_000, 0, Sequence::MAX)).is_ok());
    }

    #[test]
    fn height_lock_times_are_final_from_the_next_block() {
        let chain = SimulatedChain::new();
        let coin = funded(&chain);
        let lock = chain.tip().height + 2;
        let tx = spend(coin, 99_000, lock, Sequence::ENABLE_LOCKTIME_NO_RBF);
        assert_eq!(reason(chain.submit(&tx)), RejectReason::NonFinal);
        chain.mine(1);
        assert_eq!(reason(chain.submit(&tx)), RejectReason::NonFinal, "tip + 1 == lock time");
        chain.mine(1);
        assert!(chain.submit(&tx).is_ok(), "tip + 1 > lock time");
    }

    #[test]
    fn final_sequences_disable_the_lock_time() {
        let chain = SimulatedChain::new();
        let coin = funded(&chain);
        let lock = chain.tip().height + 100;
        assert!(chain.submit(&spend(coin, 99_000, lock, Sequence::MAX)).is_ok());
    }

    #[test]
    fn time_lock_times_follow_median_time_past() {
        let chain = SimulatedChain::new();
        let coin = funded(&chain);
        let lock = chain.tip().median_time_past + 1_800;
        let tx = spend(coin, 99_000, lock, Sequence::ENABLE_LOCKTIME_NO_RBF);
        while chain.tip().median_time_past <= lock {
            assert_eq!(reason(chain.submit(&tx)), RejectReason::NonFinal);
            chain.mine(1);
        }
        assert!(chain.submit(&tx).is_ok());
    }

    #[test]
    fn relative_height_locks_count_from_the_coin() {
        let chain = SimulatedChain::new();
        let coin = funded(&chain); // confirmed at the tip
        let tx = spend(coin, 99_000, 0, Sequence::from_height(3));
        // coin height + 3 <= next height
        assert_eq!(reason(chain.submit(&tx)), RejectReason::NonBip68Final);
        chain.mine(1);
        assert_eq!(reason(chain.submit(&tx)), RejectReason::NonBip68Final);
        chain.mine(1);
        assert!(chain.submit(&tx).is_ok());
    }

    #[test]
    fn backend_trait_answers_from_the_same_state() {
        let chain = SimulatedChain::new();
        let coin = funded(&chain);
        let tx = spend(coin.clone(), 99_000, 0, Sequence::MAX);
        let txid = now(ChainBackend::broadcast(&chain, &tx)).unwrap();
        assert_eq!(now(ChainBackend::tx_status(&chain, &txid)), Ok(TxStatus::InMempool));
        assert_eq!(now(ChainBackend::unspent_output(&chain, &coin.0)), Ok(None));
        assert_eq!(
            now(ChainBackend::unspent_output(&chain, &OutPoint { txid, vout: 0 })),
            Ok(Some(tx.output[0].clone()))
        );
        chain.set_fee_rate(FeeRate::from_sat_per_vb_u32(7));
        assert_eq!(now(chain.estimate_fee_rate(6)), Ok(FeeRate::from_sat_per_vb_u32(7)));
        assert_eq!(now(ChainBackend::tip(&chain)), Ok(chain.tip()));
        assert_eq!(chain.get_transaction(&txid), Some(tx));
        assert_eq!(chain.mempool_txids(), vec![txid]);
    }

    #[test]
    fn median_time_past_is_the_median_of_eleven_blocks() {
        let chain = SimulatedChain::new();
        let tip = chain.tip();
        assert_eq!(tip.height, START_HEIGHT);
        assert_eq!(tip.median_time_past, GENESIS_TIME + 600 * (START_HEIGHT - 5));
    }

    /// Polls a future that is ready at once.
    fn now<F: Future>(future: F) -> F::Output {
        match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(output) => output,
            Poll::Pending => panic!("the simulated chain answers at once"),
        }
    }
}
