//! The closing procedure, written once: freeze the channel (`Closing`: its best payment stops
//! moving), read it again, co-sign the best payment, broadcast it (as a package with a CPFP
//! child when the mempool refuses its fee and a key is given), make sense of a
//! `MissingInputs` answer (already mined, or the funding gone), and record the result
//! (`Closed`, or `Failed`).
//!
//! The settlement task runs it on every closing channel, with backoff around it; the close
//! endpoint (a client's cooperative close) and `paychan close` (the operator) run it once
//! through [`close_now`], and leave a close the chain did not take to the task.

use std::sync::Mutex;

use bitcoin::bip32::Xpriv;
use bitcoin::secp256k1::SecretKey;
use bitcoin::{FeeRate, OutPoint, ScriptBuf, Transaction, Txid};

use super::SettlementMetrics;
use crate::chain::{ChainBackend, ChainError, RejectReason, TxStatus};
use crate::channel::ChannelState;
use crate::store::{ChannelRecord, ChannelStore, StoreError};
use crate::wire::ChannelId;

/// What closing a channel did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseOutcome {
    /// The close is out: broadcast now, or found in the mempool or in a block. The channel is
    /// `Closed` (or was already `Closed` or `Settled`).
    Closed {
        /// The close.
        close: Transaction,
        /// The CPFP child it went out with as a package, if the mempool refused its fee alone.
        child: Option<Txid>,
    },
    /// The chain did not take the close: the channel stays `Closing`, and the settlement task
    /// retries it with backoff (and CPFP, when it has the key).
    Queued {
        /// The close that was refused.
        close: Transaction,
        /// Why.
        error: ChainError,
    },
    /// The channel cannot be closed by the server: it has no payment to close with, the key
    /// cannot sign, or its funding output is spent or gone. It is `Failed`.
    Failed,
    /// The channel is in a state that has no close (`Failed`); nothing was done.
    NotClosable(ChannelState),
}

/// Closes channel `id` now, through `chain`, with its server key derived from `master`: moves
/// a pending or open channel to closing, reads it again (the best payment is frozen from then
/// on), and runs the closing procedure once. A channel already closed or settled answers
/// [`CloseOutcome::Closed`] with its close, and is not broadcast again.
///
/// `None` when the store has no such channel.
///
/// # Errors
///
/// [`StoreError`] when the store cannot be read or written; the channel is then as it was, or
/// closing (which the settlement task finishes).
pub async fn close_now<St: ChannelStore, C: ChainBackend>(
    store: &St,
    chain: &C,
    master: &Xpriv,
    id: ChannelId,
) -> Result<Option<CloseOutcome>, StoreError> {
    let Some(record) = store.load(id).await? else { return Ok(None) };
    if matches!(record.state, ChannelState::Pending | ChannelState::Open) {
        store.transition(id, record.state, ChannelState::Closing).await?;
    }
    let Some(record) = store.load(id).await? else { return Ok(None) };
    let closer = Closer { store, chain, master, cpfp: None, metrics: None };
    Ok(Some(match record.state {
        ChannelState::Closing => closer.close(&record, None).await?,
        ChannelState::Closed | ChannelState::Settled => match closer.build(&record) {
            Some(close) => CloseOutcome::Closed { close, child: None },
            None => CloseOutcome::NotClosable(record.state),
        },
        state => CloseOutcome::NotClosable(state),
    }))
}

/// The key and floor of CPFP children (see `Settlement::with_cpfp_key`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Cpfp<'a> {
    pub(super) key: &'a SecretKey,
    pub(super) script: &'a ScriptBuf,
    pub(super) min_fee_rate: FeeRate,
}

/// Where a close stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Location {
    Confirmed,
    InMempool,
    /// Neither in the mempool nor (as far as its outputs show) in a block.
    Missing,
}

/// The procedure's means: the store, the chain, the master key, and what the settlement task
/// adds (CPFP, its metrics).
pub(super) struct Closer<'a, St, C> {
    pub(super) store: &'a St,
    pub(super) chain: &'a C,
    pub(super) master: &'a Xpriv,
    pub(super) cpfp: Option<Cpfp<'a>>,
    pub(super) metrics: Option<&'a Mutex<SettlementMetrics>>,
}

impl<St: ChannelStore, C: ChainBackend> Closer<'_, St, C> {
    fn metric(&self, update: impl FnOnce(&mut SettlementMetrics)) {
        if let Some(metrics) = self.metrics {
            update(&mut metrics.lock().unwrap_or_else(|p| p.into_inner()));
        }
    }

    /// The close of `record`: its best payment co-signed. `None` without a payment, or with a
    /// key that cannot sign.
    pub(super) fn build(&self, record: &ChannelRecord) -> Option<Transaction> {
        record.close_transaction(self.master).ok()
    }

    /// Runs the procedure on a closing channel, read after its move to closing. `child` is a
    /// CPFP child of its close broadcast before, if any.
    ///
    /// # Errors
    ///
    /// The store's, when the result cannot be recorded (the channel stays closing).
    pub(super) async fn close(
        &self,
        record: &ChannelRecord,
        child: Option<Txid>,
    ) -> Result<CloseOutcome, StoreError> {
        let id = record.id();
        let Some(close) = self.build(record) else {
            tracing::error!("no payment to settle with, or the key cannot sign: marking failed");
            self.store.transition(id, ChannelState::Closing, ChannelState::Failed).await?;
            return Ok(CloseOutcome::Failed);
        };
        let (error, child) = match self.submit(record, &close).await {
            Ok(bumped) => (None, bumped.or(child)),
            // Already mined (its outputs spent since), or the funding is gone.
            Err(error) if error.reject_reason() == Some(RejectReason::MissingInputs) => {
                match self.locate(&close, child).await {
                    Some(Location::Confirmed | Location::InMempool) => (None, child),
                    Some(Location::Missing) if !self.funding_exists(record).await => {
                        tracing::error!("the funding output is spent or gone: channel failed");
                        self.store
                            .transition(id, ChannelState::Closing, ChannelState::Failed)
                            .await?;
                        return Ok(CloseOutcome::Failed);
                    }
                    _ => (Some(error), child),
                }
            }
            Err(error) => (Some(error), child),
        };
        if let Some(error) = error {
            return Ok(CloseOutcome::Queued { close, error });
        }
        if self.store.transition(id, ChannelState::Closing, ChannelState::Closed).await? {
            tracing::info!(txid = %close.compute_txid(), "settlement broadcast");
        }
        Ok(CloseOutcome::Closed { close, child })
    }

    /// Broadcasts a close. One the mempool refuses for its fee goes out with a CPFP child as a
    /// package (when there is a CPFP key): `Some` of the child's txid then.
    pub(super) async fn submit(
        &self,
        record: &ChannelRecord,
        close: &Transaction,
    ) -> Result<Option<Txid>, ChainError> {
        let error = match self.chain.broadcast(close).await {
            Ok(_) => return Ok(None),
            Err(ChainError::Rejected { reason: RejectReason::AlreadyConfirmed, .. }) => {
                return Ok(None);
            }
            Err(error) => error,
        };
        if error.reject_reason() != Some(RejectReason::FeeTooLow) {
            return Err(error);
        }
        let Some(child) = self.cpfp_child(record, close).await else {
            tracing::error!(%error, "the settlement is below the mempool minimum and no CPFP \
                child can carry it in a package (no CPFP key, or the server's output cannot pay \
                for one)");
            self.metric(|m| m.closes_below_mempool_minimum += 1);
            return Err(error);
        };
        let txid = match self.chain.broadcast_package(close, &child).await {
            Ok(txid) => txid,
            Err(package_error) if package_error.is_unsupported() => {
                tracing::error!(%error, %package_error, "the settlement is below the mempool \
                    minimum and the chain backend has no package relay: configure a package \
                    relay (a Bitcoin Core node, or an Esplora server with POST /txs/package)");
                self.metric(|m| m.closes_below_mempool_minimum += 1);
                return Err(error);
            }
            Err(package_error) => return Err(package_error),
        };
        tracing::info!(%txid, "settlement broadcast as a package with a CPFP child");
        self.metric(|m| m.cpfp_bumps += 1);
        Ok(Some(txid))
    }

    /// Whether the funding output exists (unspent, in the mempool or a block).
    pub(super) async fn funding_exists(&self, record: &ChannelRecord) -> bool {
        !matches!(self.chain.unspent(&record.channel.outpoint()).await, Ok(None))
    }

    /// Where a close stands, found without a transaction index: the backend's status of the
    /// close (a node finds it in its mempool), else an unspent output of it (or of its CPFP
    /// `child`) in a block. `None` if the backend did not answer.
    pub(super) async fn locate(
        &self,
        close: &Transaction,
        child: Option<Txid>,
    ) -> Option<Location> {
        let txid = close.compute_txid();
        match self.chain.tx_status(&txid).await.ok()? {
            TxStatus::Confirmed { .. } => return Some(Location::Confirmed),
            TxStatus::InMempool => return Some(Location::InMempool),
            _ => {}
        }
        let mut outputs: Vec<OutPoint> =
            (0..close.output.len()).map(|vout| OutPoint::new(txid, vout as u32)).collect();
        if let Some(child) = child {
            outputs.push(OutPoint::new(child, 0));
        }
        for outpoint in outputs {
            if let Some(utxo) = self.chain.unspent(&outpoint).await.ok()?
                && utxo.confirmations > 0
            {
                return Some(Location::Confirmed);
            }
        }
        Some(Location::Missing)
    }
}
