use serde::{Deserialize, Serialize};

/// The chain's best block as the protocol sees it: the input of every time-dependent check.
///
/// The protocol core never reads a clock; callers pass the tip they got from their
/// [`ChainBackend`](crate::chain::ChainBackend). A transaction whose lock time is a height `L`
/// can enter the next block once `height >= L`; one whose lock time is a timestamp `L` once
/// `median_time_past > L` (BIP-0113).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChainTip {
    /// Height of the best block.
    pub height: u32,
    /// Median time past of the best block (BIP-0113), in seconds since the Unix epoch.
    pub median_time_past: u32,
}
