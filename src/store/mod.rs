//! Where channel state lives: the [`ChannelStore`] trait and the in-memory [`MemoryStore`].
//!
//! # The rule: persist before acknowledging
//!
//! A payment the server acknowledged is money. A store method that returns `Ok` must have made
//! its write **durable** for that store's durability model (in memory: visible to every
//! handle; in a database: committed) — the server serves a request only after the write that
//! pays for it returned. A store that cannot reach its backend returns
//! [`StoreError::Unavailable`], and the server answers 503 without serving.
//!
//! An error is no proof that nothing changed: a write whose reply was lost after it was
//! applied (a PostgreSQL commit whose acknowledgement never arrived, a Redis script that
//! finished after the response timeout) happened all the same. The server then serves
//! nothing, but the request **may have been charged** — and with an `Idempotency-Key`, its
//! claim may hold the key until it lapses. Code that acts on an error must hold for both
//! outcomes (as [`Leased`] does: it never draws from a lease whose operation failed, and
//! settles it again).
//!
//! # Atomicity
//!
//! Every method is one atomic read-modify-write on one channel (compare-and-swap semantics):
//! [`store_payment`](ChannelStore::store_payment) replaces the best payment only if the new one
//! pays the server more; [`debit`](ChannelStore::debit) succeeds only if the balance covers the
//! amount. Concurrent requests on one channel are therefore served exactly as much as was paid.
//!
//! # Implementing a store
//!
//! Methods return `impl Future + Send` (no `async_trait`); their arguments and answers
//! ([`ops::Debit`], [`ops::Lease`], …) are in [`ops`]. Stores hold public data only —
//! never private keys: the server's key for a channel is re-derived from its
//! [`key_index`](ChannelRecord::key_index). Run [`conformance::run`] against a new store in its
//! tests; every backend of this crate does, and through a [`Leased`] node too
//! ([`conformance::run_leased`]).
//!
//! # The ledger and the lifecycle, defined once
//!
//! A channel's money moves only as [`Ledger`]'s methods move it
//! (paid, spent, leased, forfeited; balance = paid − spent − leased − forfeited), and its state
//! only along [`ChannelState::may_move_to`] ([`transition`](ChannelStore::transition) refuses
//! any other move with [`StoreError::IllegalMove`]). The memory store uses the `Ledger`
//! itself; the SQL and Lua backends restate it in their languages, and the conformance
//! suite's model-based check holds them to it: random sequences of every operation, applied to
//! the backend and to a pure model built on `Ledger`, must give the same answers and leave
//! the same ledger after every step.

use core::fmt;
use std::future::Future;

use bitcoin::bip32::Xpriv;
use bitcoin::{Amount, Transaction};
use serde::{Deserialize, Serialize};

use crate::channel::{
    ChainTip, Channel, CheckedPayment, CloseError, FundingAction, FundingPolicy, Ledger,
    channel_key, server_amount,
};
use crate::channel::{ChannelState, ParseChannelStateError};
use crate::wire::{ChannelId, ChannelSnapshot};
use crate::{BackendError, MilliSats};
use ops::{
    Debit, DebitOnce, IdempotencyClaim, IdempotencyRecord, Lease, LeaseId, LeaseRequest, LeaseTake,
    StorePayment,
};

pub mod conformance;
mod leased;
mod memory;
pub mod ops;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "sqlite")]
mod sqlite;

#[cfg(feature = "redis")]
pub use self::redis::{
    DEFAULT_PREFIX as REDIS_DEFAULT_PREFIX, MAX_CHANNEL_SAT as REDIS_MAX_CHANNEL_SAT, RedisStore,
};
pub use leased::{LeaseConfig, Leased};
pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use postgres::PostgresStore;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;
/// The PostgreSQL driver, re-exported for [`PostgresStore::connect_with`].
#[cfg(feature = "postgres")]
pub use tokio_postgres;

/// What a store keeps about one channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelRecord {
    /// The agreed parameters and the funding outpoint.
    pub channel: Channel,
    /// The BIP-0032 index the server's key for this channel was derived at.
    pub key_index: u32,
    /// Where the channel is in its life.
    pub state: ChannelState,
    /// The best (highest-paying) client-signed payment so far.
    pub best: Option<Transaction>,
    /// What requests have consumed so far, as settled in the store: what nodes serving from
    /// a lease have used is added when they settle it (see [`Leased`]).
    pub spent: MilliSats,
    /// What nodes hold in live leases of this channel (see [`Leased`]): reserved, neither
    /// spent nor available to other requests. Zero without leases.
    #[serde(default)]
    pub leased: MilliSats,
    /// What lapsed leases held (their nodes died without settling them; see
    /// [`ChannelStore::expire_leases`]): maybe served, maybe not, so kept from the balance for
    /// good, but not reported to the client as spent. Zero without leases.
    #[serde(default)]
    pub forfeited: MilliSats,
    /// The chain height when the funding was broadcast: the funding policy's deadline for its
    /// confirmation counts from here (0 when unknown).
    #[serde(default)]
    pub funded_at: u32,
}

impl ChannelRecord {
    /// Creates the record of a freshly funded channel whose first payment is `first`.
    pub fn open(channel: Channel, key_index: u32, first: Transaction) -> Self {
        Self {
            channel,
            key_index,
            state: ChannelState::Open,
            best: Some(first),
            spent: MilliSats::ZERO,
            leased: MilliSats::ZERO,
            forfeited: MilliSats::ZERO,
            funded_at: 0,
        }
    }

    /// The same record, funded at `height` (see [`funded_at`](Self::funded_at)).
    #[must_use]
    pub fn with_funded_at(mut self, height: u32) -> Self {
        self.funded_at = height;
        self
    }

    /// The same record in `state`.
    #[must_use]
    pub fn with_state(mut self, state: ChannelState) -> Self {
        self.state = state;
        self
    }

    /// The channel's id.
    pub fn id(&self) -> ChannelId {
        ChannelId::new(self.channel.outpoint())
    }

    /// What the best payment pays the server.
    pub fn paid_amount(&self) -> Amount {
        self.best.as_ref().map_or(Amount::ZERO, server_amount)
    }

    /// What to do with this channel, pending or open, whose funding output stands at `funding`
    /// (its depth; `None`: neither in the UTXO set nor in the mempool) at `tip`: `policy`'s
    /// [`funding_action`](FundingPolicy::funding_action) for this record.
    pub fn funding_action(
        &self,
        policy: &FundingPolicy,
        funding: Option<u32>,
        tip: ChainTip,
    ) -> FundingAction {
        policy.funding_action(&self.channel, self.state, self.funded_at, funding, tip)
    }

    /// What the client has paid, in millisatoshis.
    pub fn paid(&self) -> MilliSats {
        MilliSats::from_sat(self.paid_amount()).unwrap_or(MilliSats::MAX)
    }

    /// The channel's money: paid, spent, leased and forfeited ([`Ledger`], whose methods are
    /// the one definition of how they move).
    pub fn ledger(&self) -> Ledger {
        Ledger {
            paid: self.paid(),
            spent: self.spent,
            leased: self.leased,
            forfeited: self.forfeited,
        }
    }

    /// What new requests can draw on: paid − spent − leased − forfeited
    /// ([`Ledger::balance`]).
    pub fn balance(&self) -> MilliSats {
        self.ledger().balance()
    }

    /// What the channel has committed: spent, held in leases (which a node may serve at any
    /// moment) and forfeited by nodes that died. A fair close must pay at least this
    /// ([`Ledger::committed`]).
    pub fn committed(&self) -> MilliSats {
        self.ledger().committed()
    }

    /// paid − spent: the balance as the client sees it, leases counted as unspent until a
    /// node settles what it used of them. Never below the channel's true unspent balance,
    /// so a client judging the server's charges by it is never misled into seeing an
    /// overcharge ([`Ledger::unspent`]).
    pub fn unspent(&self) -> MilliSats {
        self.ledger().unspent()
    }

    /// The channel's state as a client sees it in a refusal of a request costing `price`:
    /// the least a new payment must pay, and a suggestion that prepays `prepay` more.
    pub fn snapshot(&self, price: MilliSats, prepay: MilliSats) -> ChannelSnapshot {
        let params = self.channel.params();
        let paid = self.paid_amount();
        let max = params.max_server_amount();
        let needed = self.committed().checked_add(price).map(MilliSats::to_sat_ceil);
        let min = needed
            .map(|needed| needed.max(paid + Amount::ONE_SAT).max(params.min_server_amount()))
            .filter(|min| *min <= max);
        let suggested = min.map(|min| {
            min.checked_add(prepay.to_sat_ceil()).map_or(max, |suggested| suggested.min(max))
        });
        let expiry = params.expiry.to_consensus_u32();
        ChannelSnapshot {
            channel: self.id(),
            state: self.state,
            paid_msat: self.paid(),
            spent_msat: self.committed(),
            leased_msat: self.leased.saturating_add(self.forfeited),
            balance_msat: self.balance(),
            price_msat: price,
            capacity_left_sat: max.checked_sub(paid).unwrap_or(Amount::ZERO),
            min_server_amount_sat: min,
            suggested_server_amount_sat: suggested,
            expiry,
            close_by: expiry.saturating_sub(params.close_margin),
        }
    }

    /// The close the server broadcasts: the best payment co-signed with the server key derived
    /// from `master` at [`key_index`](Self::key_index). The close endpoint and the settlement
    /// task both build it here, from a record read once the channel is closing (its best is
    /// frozen then), so every node builds the same transaction.
    ///
    /// # Errors
    ///
    /// [`CloseError::NoPayment`] without a payment; [`CloseError::WrongKey`] if `master` does
    /// not derive the channel's server key.
    pub fn close_transaction(&self, master: &Xpriv) -> Result<Transaction, CloseError> {
        let best = self.best.as_ref().ok_or(CloseError::NoPayment)?;
        let key = channel_key(master, self.key_index).map_err(|_| CloseError::WrongKey)?;
        self.channel.close_transaction(best, &key)
    }
}

/// An error from a [`ChannelStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreError {
    /// No channel with this id.
    NotFound,
    /// [`create`](ChannelStore::create) found a channel with this id.
    AlreadyExists,
    /// The backend could not be reached, failed or did not answer in time. Whether the
    /// operation happened is unknown: a reply lost after the backend applied it leaves it
    /// applied (a debit charged, a claim held).
    Unavailable {
        /// What the backend reported.
        source: BackendError,
    },
    /// [`transition`](ChannelStore::transition) was asked for a move the lifecycle does not
    /// have ([`ChannelState::may_move_to`]); nothing changed. A bug in the caller.
    IllegalMove {
        /// The state the caller expected.
        from: ChannelState,
        /// The state it asked for.
        to: ChannelState,
    },
}

impl From<ParseChannelStateError> for StoreError {
    fn from(error: ParseChannelStateError) -> Self {
        Self::unavailable(error)
    }
}

impl StoreError {
    /// A backend failure: `error` is the backend's own error, or a message.
    pub fn unavailable(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Unavailable { source: BackendError::new(error) }
    }
}

/// Now, in milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since.map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}

/// Checks that a counter value is a usable hardened BIP-0032 index.
pub(crate) fn key_index(value: u64) -> Result<u32, StoreError> {
    u32::try_from(value)
        .ok()
        .filter(|index| *index < 1 << 31)
        .ok_or_else(|| StoreError::unavailable("key indexes exhausted"))
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotFound => f.write_str("no such channel"),
            Self::AlreadyExists => f.write_str("a channel with this id already exists"),
            Self::Unavailable { source } => write!(f, "channel store unavailable: {source}"),
            Self::IllegalMove { from, to } => {
                write!(f, "no channel moves from {} to {}", from.as_str(), to.as_str())
            }
        }
    }
}

impl std::error::Error for StoreError {
    /// The cause of the backend's error (whose own message is part of this one's).
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Unavailable { source } => std::error::Error::source(source),
            _ => None,
        }
    }
}

/// Persistent, atomic channel state. See the [module docs](self) for the rules.
pub trait ChannelStore: Send + Sync + 'static {
    /// Creates a channel record.
    ///
    /// # Errors
    ///
    /// [`StoreError::AlreadyExists`] if the id is taken.
    fn create(&self, record: ChannelRecord) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Loads a channel; `Ok(None)` if it does not exist.
    fn load(
        &self,
        id: ChannelId,
    ) -> impl Future<Output = Result<Option<ChannelRecord>, StoreError>> + Send;

    /// Makes `payment` the channel's best **only if** it pays the server strictly more than
    /// the stored best (compare-and-swap) and the channel is open: once a channel is closing,
    /// its best payment — the one the settlement co-signs — never changes. The caller has
    /// checked the payment ([`Channel::check_payment`]).
    fn store_payment(
        &self,
        id: ChannelId,
        payment: Transaction,
    ) -> impl Future<Output = Result<StorePayment, StoreError>> + Send;

    /// Debits `amount` if the balance ([`ChannelRecord::balance`]) covers it and the channel
    /// is open.
    fn debit(
        &self,
        id: ChannelId,
        amount: MilliSats,
    ) -> impl Future<Output = Result<Debit, StoreError>> + Send;

    /// Stores `payment` — checked by the protocol core, see [`CheckedPayment`] — as
    /// [`store_payment`](Self::store_payment) does (only if it pays more and the channel is
    /// open), then debits `amount` as [`debit`](Self::debit) does, **in one
    /// atomic operation**: the layer's path for a request carrying a new payment, so a shared
    /// store answers it in one round trip. A payment that does not pay more is not an error:
    /// the debit is still attempted. A refused debit leaves a stored payment stored (it was
    /// acknowledged as the channel's best).
    ///
    /// The default runs the two methods one after the other, which is correct (each is
    /// atomic, and the best only grows) but costs two round trips; the crate's backends
    /// override it.
    fn pay(
        &self,
        id: ChannelId,
        payment: CheckedPayment,
        amount: MilliSats,
    ) -> impl Future<Output = Result<Debit, StoreError>> + Send {
        async move {
            let _stored_or_stale = self.store_payment(id, payment.into_transaction()).await?;
            self.debit(id, amount).await
        }
    }

    /// Moves an **open or pending** channel to closing with `payment` as its settlement in
    /// place of the best payment, **in one atomic operation**, if `payment` covers what the
    /// channel committed (spent, leased and forfeited, [`ChannelRecord::committed`]): the fair close, settled at the metered amount, which may pay the server
    /// less than the best ([`Channel::check_fair_payment`](crate::channel::Channel::check_fair_payment)).
    /// `Ok(false)`, nothing changed, if the channel is no longer open or pending or spent more
    /// meanwhile. From `Closing` on nothing is debited, so what was metered cannot move.
    fn close_with(
        &self,
        id: ChannelId,
        payment: CheckedPayment,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Debits `amount` as [`debit`](Self::debit) does **and** claims `claim.key` on channel
    /// `id` for the request `claim.fingerprint`, in one atomic operation — unless a live
    /// record (one that expires after `claim.now`) holds the key already: then nothing is
    /// debited or changed, and the record is returned. A refused debit claims nothing. The
    /// claim lives until `claim.expires_at`, or until [`finish_once`](Self::finish_once).
    /// Concurrent calls with one key: exactly one debits.
    fn debit_once(
        &self,
        id: ChannelId,
        amount: MilliSats,
        claim: &IdempotencyClaim,
    ) -> impl Future<Output = Result<DebitOnce, StoreError>> + Send;

    /// Finishes `claim` (made by [`debit_once`](Self::debit_once)) on channel `id`, if its
    /// key is still held by it, in progress: keeps `response` (the layer's encoding) until
    /// `expires_at` (milliseconds since the Unix epoch), or, with `None`, releases the key so
    /// that a retry runs again. Nothing changes if the key is finished already, or if the
    /// claim lapsed and another request claimed the key since (its claim lapses at another
    /// time): a request that outlived its claim never answers for the one that took over.
    fn finish_once(
        &self,
        id: ChannelId,
        claim: &IdempotencyClaim,
        response: Option<Vec<u8>>,
        expires_at: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Settles a node's lease and takes a new one, as `request` says, in one atomic
    /// operation (see [`LeaseRequest`] and [`Lease`]); what a new lease holds is
    /// [`LeaseTake::grant`] of the balance ([`ChannelRecord::balance`]). A lease adds to
    /// `leased`; settling it adds what was used to `spent` and removes it from `leased`.
    /// Never refused for the channel's state when only settling.
    fn lease(
        &self,
        id: ChannelId,
        request: LeaseRequest,
    ) -> impl Future<Output = Result<Lease, StoreError>> + Send;

    /// Settles every lease that lapsed at or before `now` (milliseconds since the Unix
    /// epoch) as **forfeited**: its node died without settling it, and what it served of it
    /// cannot be known, so all of it moves from `leased` to `forfeited`, kept from the
    /// balance for good (never served unpaid). Returns what was forfeited.
    fn expire_leases(&self, now: u64)
    -> impl Future<Output = Result<MilliSats, StoreError>> + Send;

    /// Gives back `amount` of an earlier debit (never making `spent` negative); returns the
    /// new paid − spent.
    fn credit(
        &self,
        id: ChannelId,
        amount: MilliSats,
    ) -> impl Future<Output = Result<MilliSats, StoreError>> + Send;

    /// Moves the channel from state `from` to `to`; `Ok(false)` if it was not in `from`.
    ///
    /// # Errors
    ///
    /// [`StoreError::IllegalMove`], before anything is read, for a move
    /// [`ChannelState::may_move_to`] does not allow (check it with [`legal_move`]).
    fn transition(
        &self,
        id: ChannelId,
        from: ChannelState,
        to: ChannelState,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Allocates a BIP-0032 index for a new channel's server key: never the same twice, also
    /// across restarts, so that no server key is ever reused.
    fn next_key_index(&self) -> impl Future<Output = Result<u32, StoreError>> + Send;

    /// Lists the channels in `state`, those with the earliest expiry first.
    fn list(
        &self,
        state: ChannelState,
    ) -> impl Future<Output = Result<Vec<ChannelRecord>, StoreError>> + Send;

    /// How many channels are in `state`, without reading them: the settlement task counts
    /// the settled channels it never acts on this way. The default lists them; the crate's
    /// backends count.
    fn count(&self, state: ChannelState) -> impl Future<Output = Result<usize, StoreError>> + Send {
        async move { Ok(self.list(state).await?.len()) }
    }
}

/// `Ok` if a channel may move from `from` to `to`, else [`StoreError::IllegalMove`]: what every
/// backend's [`transition`](ChannelStore::transition) checks first.
///
/// # Errors
///
/// [`StoreError::IllegalMove`].
pub fn legal_move(from: ChannelState, to: ChannelState) -> Result<(), StoreError> {
    if from.may_move_to(to) { Ok(()) } else { Err(StoreError::IllegalMove { from, to }) }
}

/// Sort key for "earliest expiry first": block heights before timestamps, then by value.
pub(crate) fn expiry_key(record: &ChannelRecord) -> (bool, u32) {
    let expiry = record.channel.params().expiry;
    (expiry.is_block_time(), expiry.to_consensus_u32())
}
