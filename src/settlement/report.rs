//! What the settlement task reports: its counters, one pass, its errors.

use std::collections::BTreeMap;

use bitcoin::Amount;

use crate::chain::ChainError;
use crate::store::StoreError;

/// Counters and gauges of the settlement task; a snapshot from [`Settlement::metrics`](super::Settlement::metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SettlementMetrics {
    /// Channels per state at the last pass (by [`ChannelState::as_str`](crate::channel::ChannelState::as_str)).
    pub channels: BTreeMap<&'static str, usize>,
    /// What the settlements confirmed by this task paid the server.
    pub sats_settled: Amount,
    /// Channels closing or closed but not yet settled, at the last pass.
    pub closes_pending: usize,
    /// Broadcasts that failed (each is retried).
    pub broadcast_failures: u64,
    /// CPFP children broadcast.
    pub cpfp_bumps: u64,
    /// Channels marked failed because of their funding.
    pub failed_fundings: u64,
    /// Settlements found neither in the mempool nor in a block (evicted, or lost with a node's
    /// mempool) and broadcast again.
    pub rebroadcasts: u64,
    /// Settlements refused for a fee rate below the mempool minimum that no package could
    /// carry: the backend has no package relay (and no `esplora::PackageRelay` was given), or
    /// the task has no CPFP key (or the server's output cannot pay for a child). Each is
    /// retried; alert on any increase: if the minimum stays up until the refund is valid, the
    /// client's refund wins.
    pub closes_below_mempool_minimum: u64,
    /// Open channels closed before their close margin because the mempool minimum neared their
    /// payment fee rate while no package path was available
    /// ([`with_early_close`](super::Settlement::with_early_close)).
    pub early_closes: u64,
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PassReport {
    /// Pending channels that opened.
    pub opened: usize,
    /// Channels marked failed.
    pub failed: usize,
    /// Open channels suspended because their unconfirmed funding vanished.
    pub suspended: usize,
    /// Open channels that reached their close margin (or were closed early).
    pub closing: usize,
    /// Settlements broadcast.
    pub broadcast: usize,
    /// Settlements confirmed.
    pub settled: usize,
    /// CPFP children broadcast.
    pub bumped: usize,
    /// Operations that failed and will be retried.
    pub retrying: usize,
}

/// Why a pass stopped early (a per-channel failure only delays that channel).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SettlementError {
    /// The chain backend did not answer the tip.
    Chain(ChainError),
    /// The store could not list channels.
    Store(StoreError),
}

impl core::fmt::Display for SettlementError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Chain(e) => write!(f, "settlement: {e}"),
            Self::Store(e) => write!(f, "settlement: {e}"),
        }
    }
}

impl std::error::Error for SettlementError {}
