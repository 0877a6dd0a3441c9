//! The chain backend the configuration names, as one type.

use paychan::bitcoin::{FeeRate, Network, OutPoint, Script, Transaction, Txid};
use paychan::chain::bitcoind::BitcoindRpc;
use paychan::chain::esplora::Esplora;
use paychan::chain::{ChainBackend, ChainError, TxStatus, Utxo};
use paychan::channel::ChainTip;

use crate::config::ChainSource;

/// Bitcoin Core or Esplora.
#[derive(Debug, Clone)]
pub(crate) enum Chain {
    Bitcoind(BitcoindRpc),
    Esplora(Esplora),
}

impl Chain {
    pub(crate) fn new(source: &ChainSource) -> Result<Self, ChainError> {
        Ok(match source {
            ChainSource::Bitcoind { url, auth } => {
                Self::Bitcoind(BitcoindRpc::new(url, auth.clone())?)
            }
            ChainSource::Esplora { url } => Self::Esplora(Esplora::new(url)?),
        })
    }
}

/// Runs `$call` on whichever backend this is.
macro_rules! both {
    ($self:ident, $chain:ident => $call:expr) => {
        match $self {
            Chain::Bitcoind($chain) => $call.await,
            Chain::Esplora($chain) => $call.await,
        }
    };
}

impl ChainBackend for Chain {
    async fn broadcast(&self, tx: &Transaction) -> Result<Txid, ChainError> {
        both!(self, c => c.broadcast(tx))
    }

    async fn tx_status(&self, txid: &Txid) -> Result<TxStatus, ChainError> {
        both!(self, c => c.tx_status(txid))
    }

    async fn tip(&self) -> Result<ChainTip, ChainError> {
        both!(self, c => c.tip())
    }

    async fn estimate_fee_rate(&self, target_blocks: u16) -> Result<FeeRate, ChainError> {
        both!(self, c => c.estimate_fee_rate(target_blocks))
    }

    async fn unspent(&self, outpoint: &OutPoint) -> Result<Option<Utxo>, ChainError> {
        both!(self, c => c.unspent(outpoint))
    }

    async fn unspent_outputs_of(
        &self,
        script: &Script,
    ) -> Result<Vec<(OutPoint, Utxo)>, ChainError> {
        both!(self, c => c.unspent_outputs_of(script))
    }

    async fn min_relay_fee_rate(&self) -> Result<FeeRate, ChainError> {
        both!(self, c => c.min_relay_fee_rate())
    }

    async fn mempool_min_fee_rate(&self) -> Result<FeeRate, ChainError> {
        both!(self, c => c.mempool_min_fee_rate())
    }

    async fn network(&self) -> Result<Network, ChainError> {
        both!(self, c => c.network())
    }

    async fn has_package_relay(&self) -> Result<bool, ChainError> {
        both!(self, c => c.has_package_relay())
    }

    async fn broadcast_package(
        &self,
        parent: &Transaction,
        child: &Transaction,
    ) -> Result<Txid, ChainError> {
        both!(self, c => c.broadcast_package(parent, child))
    }
}
