//! Child-pays-for-parent: a child of the close, spending the server's output, that makes the
//! package pay the fee rate the close alone does not.

use bitcoin::absolute::LockTime;
use bitcoin::transaction::Version;
use bitcoin::{Amount, OutPoint, ScriptBuf, Sequence, Transaction, TxIn, TxOut, Witness};

use super::close::{Closer, Cpfp};
use super::{PassReport, Settlement};
use crate::chain::ChainBackend;
use crate::store::{ChannelRecord, ChannelStore};

/// The virtual size of a one-input, one-output P2WPKH child, rounded up.
const CHILD_VSIZE: u64 = 110;

impl<St: ChannelStore, C: ChainBackend> Settlement<St, C> {
    /// Broadcasts a child of `close` spending the server's output, so that parent and child
    /// together pay the backend's current fee estimate.
    pub(super) async fn bump(
        &mut self,
        record: &ChannelRecord,
        close: &Transaction,
        report: &mut PassReport,
    ) {
        let id = record.id();
        let Some(child) = self.closer().cpfp_child(record, close).await else { return };
        match self.chain.broadcast(&child).await {
            Ok(txid) => {
                tracing::info!(%txid, "settlement bumped by CPFP");
                self.bumps.insert(id, txid);
                report.bumped += 1;
                self.metric(|m| m.cpfp_bumps += 1);
            }
            Err(error) => {
                tracing::warn!(%error, "CPFP broadcast failed");
                self.failed(id, report);
            }
        }
    }
}

impl<St: ChannelStore, C: ChainBackend> Closer<'_, St, C> {
    /// A child of `close` spending the server's output, so that parent and child together pay
    /// the backend's current fee estimate (never below the configured floor). `None` without
    /// a CPFP key, or when the server's output cannot pay for it.
    pub(super) async fn cpfp_child(
        &self,
        record: &ChannelRecord,
        close: &Transaction,
    ) -> Option<Transaction> {
        let Cpfp { key, script, min_fee_rate } = self.cpfp?;
        let server_output = close.output.first()?;
        if server_output.script_pubkey != *script {
            tracing::warn!("the CPFP key does not own the server's payout script");
            return None;
        }
        // The estimate when the backend has one, never below the configured floor (a node
        // without fee data, as on regtest, has no estimate).
        let rate = match self.chain.estimate_fee_rate(2).await {
            Ok(rate) => rate.max(min_fee_rate),
            Err(_) => min_fee_rate,
        };
        let parent_fee = record
            .channel
            .params()
            .value
            .checked_sub(close.output.iter().map(|o| o.value).sum())?;
        let package_vsize = close.weight().to_vbytes_ceil() + CHILD_VSIZE;
        let package_fee = rate.fee_vb(package_vsize)?;
        // At least the child's own minimum relay fee (1 sat/vB).
        let child_fee = package_fee
            .checked_sub(parent_fee)
            .unwrap_or(Amount::ZERO)
            .max(Amount::from_sat(CHILD_VSIZE));
        let value = server_output.value.checked_sub(child_fee)?;
        if value < script.minimal_non_dust() {
            tracing::warn!(%child_fee, "the server's output cannot pay for a CPFP child");
            return None;
        }
        let mut child = Transaction {
            version: Version::TWO,
            lock_time: LockTime::ZERO,
            input: vec![TxIn {
                previous_output: OutPoint::new(close.compute_txid(), 0),
                script_sig: ScriptBuf::new(),
                sequence: Sequence::ENABLE_RBF_NO_LOCKTIME,
                witness: Witness::new(),
            }],
            output: vec![TxOut { value, script_pubkey: script.clone() }],
        };
        child.input[0].witness =
            crate::channel::sig::p2wpkh_witness(&child, 0, server_output, key).ok()?;
        Some(child)
    }
}
