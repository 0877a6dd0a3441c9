//! Chain backends: where transactions are broadcast and chain state is read.
//!
//! [`ChainBackend`] is the one trait the server, the client and settlement use. The crate
//! ships [`SimulatedChain`](sim::SimulatedChain) (feature `sim`), an in-process chain for tests
//! and demos that checks every input script with Bitcoin Core's consensus interpreter and
//! applies Bitcoin Core's main relay-policy rules ([`policy`]).

use core::fmt;
use std::future::Future;

use bitcoin::{FeeRate, Network, OutPoint, Script, Transaction, TxOut, Txid};

use crate::BackendError;
use crate::channel::ChainTip;

#[cfg(feature = "bitcoind")]
pub mod bitcoind;
#[cfg(any(feature = "bitcoind", feature = "esplora"))]
mod core_reject;
#[cfg(feature = "esplora")]
pub mod esplora;
#[cfg(any(feature = "bitcoind", feature = "esplora"))]
mod http;
pub mod policy;
#[cfg(feature = "sim")]
pub mod sim;

/// Where a transaction stands, as far as a backend can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TxStatus {
    /// Neither in the mempool nor in a block.
    Unknown,
    /// Accepted to the mempool, not yet in a block.
    InMempool,
    /// In a block of the best chain.
    Confirmed {
        /// Height of the block that holds the transaction.
        height: u32,
        /// Number of confirmations (1 when in the tip block).
        confirmations: u32,
    },
}

/// Why a backend refused to broadcast a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RejectReason {
    /// An input spends an output that does not exist (or was already spent in a block).
    MissingInputs,
    /// An input is already spent by another transaction in the mempool.
    Conflict,
    /// The outputs are worth more than the inputs.
    ValueCreation,
    /// The absolute lock time has not been reached.
    NonFinal,
    /// A relative lock time (BIP-0068) has not been reached.
    NonBip68Final,
    /// An input script fails under the consensus interpreter.
    ScriptFailure,
    /// The transaction breaks a relay-policy (standardness) rule.
    NonStandard,
    /// The fee is below the minimum relay fee.
    FeeTooLow,
    /// The fee rate is above the backend's maximum (Bitcoin Core's `maxfeerate`).
    FeeTooHigh,
    /// The transaction is already in a block.
    AlreadyConfirmed,
    /// The transaction is malformed (no inputs, no outputs, duplicate inputs, ...).
    Invalid,
}

impl RejectReason {
    /// The stable, machine-readable name of this reason.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MissingInputs => "missing-inputs",
            Self::Conflict => "conflict",
            Self::ValueCreation => "value-creation",
            Self::NonFinal => "non-final",
            Self::NonBip68Final => "non-bip68-final",
            Self::ScriptFailure => "script-failure",
            Self::NonStandard => "non-standard",
            Self::FeeTooLow => "fee-too-low",
            Self::FeeTooHigh => "fee-too-high",
            Self::AlreadyConfirmed => "already-confirmed",
            Self::Invalid => "invalid",
        }
    }
}

/// An error from a [`ChainBackend`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChainError {
    /// The backend refused the transaction.
    Rejected {
        /// The reason, mapped to a stable kind.
        reason: RejectReason,
        /// The backend's own message (for logs).
        message: String,
    },
    /// The backend could not be reached or answered something unexpected; retrying may help.
    Unavailable {
        /// What the backend (or the connection to it) reported.
        source: BackendError,
    },
    /// The backend does not offer the operation at all (an Esplora server without
    /// `POST /txs/package`): retrying the same backend will not help.
    Unsupported {
        /// What is missing, and where.
        message: String,
    },
    /// The backend follows another network than the one configured (a regtest node behind a
    /// mainnet server would accept regtest coins as payment): see [`check_network`].
    WrongNetwork {
        /// The network the server (or the client) is configured for.
        expected: Network,
        /// The network the backend's chain is.
        actual: Network,
    },
}

impl ChainError {
    #[cfg(any(feature = "sim", feature = "bitcoind", feature = "esplora"))]
    pub(crate) fn rejected(reason: RejectReason, message: impl Into<String>) -> Self {
        Self::Rejected { reason, message: message.into() }
    }

    /// The backend could not be reached or answered something unexpected: `error` is what
    /// went wrong, an error or a message.
    pub fn unavailable(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Unavailable { source: BackendError::new(error) }
    }

    /// The rejection reason, if the backend refused a transaction.
    pub fn reject_reason(&self) -> Option<RejectReason> {
        match self {
            Self::Rejected { reason, .. } => Some(*reason),
            Self::Unavailable { .. } | Self::Unsupported { .. } | Self::WrongNetwork { .. } => None,
        }
    }

    /// Whether the backend does not offer the operation ([`ChainError::Unsupported`]).
    pub fn is_unsupported(&self) -> bool {
        matches!(self, Self::Unsupported { .. })
    }
}

impl fmt::Display for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rejected { reason, message } => {
                write!(f, "transaction rejected ({}): {message}", reason.code())
            }
            Self::Unavailable { source } => write!(f, "chain backend unavailable: {source}"),
            Self::Unsupported { message } => {
                write!(f, "not supported by the chain backend: {message}")
            }
            Self::WrongNetwork { expected, actual } => {
                write!(
                    f,
                    "the chain backend is on {actual}, but the network configured is {expected}"
                )
            }
        }
    }
}

impl std::error::Error for ChainError {
    /// The cause of the backend's error (whose own message is part of this one's).
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Unavailable { source } => std::error::Error::source(source),
            Self::Rejected { .. } | Self::Unsupported { .. } | Self::WrongNetwork { .. } => None,
        }
    }
}

/// A view of the Bitcoin chain that can also relay transactions.
///
/// Methods return `impl Future + Send` so that implementations may do network I/O; the
/// simulated chain answers immediately.
pub trait ChainBackend: Send + Sync {
    /// Submits `tx` to the mempool (and the network). A transaction that is already in the
    /// mempool is not an error: its txid is returned.
    fn broadcast(&self, tx: &Transaction) -> impl Future<Output = Result<Txid, ChainError>> + Send;

    /// Reports whether `txid` is unknown, in the mempool or confirmed.
    fn tx_status(&self, txid: &Txid) -> impl Future<Output = Result<TxStatus, ChainError>> + Send;

    /// Returns the best block's height and median time past.
    fn tip(&self) -> impl Future<Output = Result<ChainTip, ChainError>> + Send;

    /// Estimates the fee rate needed to confirm within `target_blocks`.
    fn estimate_fee_rate(
        &self,
        target_blocks: u16,
    ) -> impl Future<Output = Result<FeeRate, ChainError>> + Send;

    /// Returns the output at `outpoint` and its depth if it exists and is unspent (mempool
    /// spends count as spent; unconfirmed outputs count as existing, with 0 confirmations),
    /// and whether a coinbase created it ([`Utxo::coinbase`]: Core's `gettxout` says so,
    /// Esplora's transaction does; the simulated chain's faucet coins are not coinbases).
    ///
    /// This is answered from the UTXO set and the mempool, which every node has (no
    /// transaction index): the settlement task decides everything about a channel's funding
    /// from it.
    fn unspent(
        &self,
        outpoint: &OutPoint,
    ) -> impl Future<Output = Result<Option<Utxo>, ChainError>> + Send;

    /// Returns the output at `outpoint` if it exists and is unspent: [`unspent`](Self::unspent)
    /// without the depth.
    fn unspent_output(
        &self,
        outpoint: &OutPoint,
    ) -> impl Future<Output = Result<Option<TxOut>, ChainError>> + Send {
        let outpoint = *outpoint;
        async move { Ok(self.unspent(&outpoint).await?.map(|utxo| utxo.output)) }
    }

    /// The unspent outputs paying `script`, with their depth: how a wallet of one key finds
    /// its coins ([`KeyWallet::sync`](crate::client::KeyWallet::sync)). What "unspent" covers
    /// depends on the backend's index: Bitcoin Core scans its UTXO set (`scantxoutset`:
    /// confirmed outputs, mempool spends not seen), Esplora asks its address index (mempool
    /// included).
    ///
    /// The default answers [`ChainError::Unavailable`]: not every backend indexes outputs by
    /// script, and nothing on the server side needs it.
    fn unspent_outputs_of(
        &self,
        script: &Script,
    ) -> impl Future<Output = Result<Vec<(OutPoint, Utxo)>, ChainError>> + Send {
        let _ = script;
        std::future::ready(Err(ChainError::unavailable(
            "this chain backend cannot list outputs by script",
        )))
    }

    /// The lowest fee rate at which the backend relays a transaction on its own (Bitcoin Core's
    /// `minrelaytxfee`). No package can carry a (non-TRUC) transaction below it, so the server
    /// never agrees to payments below it. The default is [`policy::MIN_RELAY_FEE_RATE`].
    fn min_relay_fee_rate(&self) -> impl Future<Output = Result<FeeRate, ChainError>> + Send {
        std::future::ready(Ok(policy::MIN_RELAY_FEE_RATE))
    }

    /// The lowest fee rate the mempool takes a transaction at right now (Bitcoin Core's
    /// `mempoolminfee`): the relay minimum, raised while the mempool is full. A close below it
    /// gets in only as a package ([`broadcast_package`](Self::broadcast_package)). The default
    /// is [`min_relay_fee_rate`](Self::min_relay_fee_rate).
    fn mempool_min_fee_rate(&self) -> impl Future<Output = Result<FeeRate, ChainError>> + Send {
        self.min_relay_fee_rate()
    }

    /// The network the backend's chain is, so that a server configured for one network never
    /// runs on another's chain ([`check_network`], which [`Merchant::start`](crate::Merchant::start)
    /// calls): a mainnet server on a regtest node would take worthless regtest coins as
    /// payment and serve for them.
    ///
    /// A network, not a genesis block hash: a [`Network`] is what a server is configured
    /// with, and both backends map onto it exactly. Bitcoin Core names its chain in
    /// `getblockchaininfo` (`chain`), the call it already answers for the tip (its genesis
    /// hash, `getblockhash 0`, would tell no more); an Esplora server does not name its chain
    /// but gives its genesis block's hash (`GET /block-height/0`), which is one network's. Every signet, the default one and custom ones (`-signetchallenge`),
    /// has the same genesis block in Bitcoin Core (only the challenge and the message start
    /// differ): a backend on a custom signet reads [`Network::Signet`], which is what a
    /// server on a custom signet is configured with.
    ///
    /// A chain the backend names but [`Network`] does not know (a future test network, an
    /// Esplora server with another genesis block) is [`ChainError::Unavailable`]: refused, not
    /// guessed. The default answers [`ChainError::Unsupported`]: a backend that cannot tell
    /// (then [`check_network`] only warns).
    fn network(&self) -> impl Future<Output = Result<Network, ChainError>> + Send {
        std::future::ready(Err(ChainError::Unsupported {
            message: "this chain backend does not tell its network".to_owned(),
        }))
    }

    /// Whether [`broadcast_package`](Self::broadcast_package) can carry a parent below the
    /// mempool minimum by its child's fee (package relay). The default answers `false`: the
    /// default `broadcast_package` submits the two one by one.
    fn has_package_relay(&self) -> impl Future<Output = Result<bool, ChainError>> + Send {
        std::future::ready(Ok(false))
    }

    /// Submits a parent and its child together, so that the child's fee can carry a parent
    /// whose own fee rate is below the mempool's current minimum (Bitcoin Core's
    /// `submitpackage`, 1-parent-1-child package relay). The default submits them one by one.
    fn broadcast_package(
        &self,
        parent: &Transaction,
        child: &Transaction,
    ) -> impl Future<Output = Result<Txid, ChainError>> + Send {
        let (parent, child) = (parent.clone(), child.clone());
        async move {
            self.broadcast(&parent).await?;
            self.broadcast(&child).await
        }
    }
}

/// An unspent output, as [`ChainBackend::unspent`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Utxo {
    /// The output.
    pub output: TxOut,
    /// Confirmations of the transaction that created it: 0 while it is in the mempool.
    pub confirmations: u32,
    /// Whether a coinbase transaction created it: then it can be spent only once it has
    /// [`COINBASE_MATURITY`] confirmations ([`is_spendable`](Self::is_spendable)).
    pub coinbase: bool,
}

/// Confirmations a coinbase output needs before a transaction spending it is valid (in the
/// next block, and so in the mempool).
pub const COINBASE_MATURITY: u32 = 100;

impl Utxo {
    /// An output with `confirmations`, not created by a coinbase.
    pub fn new(output: TxOut, confirmations: u32) -> Self {
        Self { output, confirmations, coinbase: false }
    }

    /// The same output, created by a coinbase transaction if `coinbase`.
    #[must_use]
    pub fn with_coinbase(mut self, coinbase: bool) -> Self {
        self.coinbase = coinbase;
        self
    }

    /// Whether a transaction spending it can enter the mempool now: any output but an
    /// immature coinbase's.
    ///
    /// ```
    /// use paychan::bitcoin::{Amount, ScriptBuf, TxOut};
    /// use paychan::chain::Utxo;
    ///
    /// let output = TxOut { value: Amount::from_sat(50_000), script_pubkey: ScriptBuf::new() };
    /// assert!(Utxo::new(output.clone(), 1).is_spendable());
    /// assert!(!Utxo::new(output.clone(), 99).with_coinbase(true).is_spendable());
    /// assert!(Utxo::new(output, 100).with_coinbase(true).is_spendable());
    /// ```
    pub fn is_spendable(&self) -> bool {
        !self.coinbase || self.confirmations >= COINBASE_MATURITY
    }
}

/// Checks that `chain` follows `expected`, the network a server (or a client) is configured
/// for: [`Merchant::start`](crate::Merchant::start) calls it before anything else, and so
/// should a server built by hand from [`Negotiation`](crate::server::Negotiation),
/// [`PaywallLayer`](crate::server::PaywallLayer) and [`Settlement`](crate::settlement::Settlement),
/// before it listens.
///
/// A backend that cannot tell its network ([`ChainError::Unsupported`], the default of
/// [`ChainBackend::network`]) passes with a warning in the log: the check is only as good as
/// the backend. Bitcoin Core ([`BitcoindRpc`](bitcoind::BitcoindRpc)), Esplora
/// ([`Esplora`](esplora::Esplora)) and the simulated chain (regtest) tell theirs.
///
/// # Errors
///
/// [`ChainError::WrongNetwork`] if the backend is on another network; any other error of
/// [`ChainBackend::network`] (the backend is down, or on a chain no [`Network`] names).
///
/// # Examples
///
/// ```
/// # #[cfg(feature = "sim")] {
/// use paychan::bitcoin::Network;
/// use paychan::chain::{ChainError, check_network, sim::SimulatedChain};
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let chain = SimulatedChain::new(); // a regtest chain
/// assert_eq!(check_network(&chain, Network::Regtest).await, Ok(()));
/// assert_eq!(
///     check_network(&chain, Network::Bitcoin).await,
///     Err(ChainError::WrongNetwork { expected: Network::Bitcoin, actual: Network::Regtest })
/// );
/// # });
/// # }
/// ```
pub async fn check_network<C: ChainBackend>(
    chain: &C,
    expected: Network,
) -> Result<(), ChainError> {
    match chain.network().await {
        Ok(actual) if actual == expected => Ok(()),
        Ok(actual) => Err(ChainError::WrongNetwork { expected, actual }),
        Err(error) if error.is_unsupported() => {
            tracing::warn!(
                %expected,
                %error,
                "the chain backend cannot tell its network: not checked against the configured one"
            );
            Ok(())
        }
        Err(error) => Err(error),
    }
}

/// Follows the chain's tip: returns a receiver that always holds the latest [`ChainTip`],
/// polled from `chain` every `every` by a background tokio task. The task stops when every
/// receiver is dropped; a failed poll keeps the last known tip and tries again.
///
/// This is what [`PaywallLayer`](crate::server::PaywallLayer) reads to refuse payments inside
/// a channel's close margin.
///
/// # Errors
///
/// The first poll's [`ChainError`]: without a tip the server cannot check expiries.
pub async fn follow_tip<C: ChainBackend + 'static>(
    chain: C,
    every: std::time::Duration,
) -> Result<tokio::sync::watch::Receiver<ChainTip>, ChainError> {
    let (sender, receiver) = tokio::sync::watch::channel(chain.tip().await?);
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            if sender.is_closed() {
                break;
            }
            if let Ok(tip) = chain.tip().await {
                sender.send_if_modified(|current| std::mem::replace(current, tip) != tip);
            }
        }
    });
    Ok(receiver)
}
