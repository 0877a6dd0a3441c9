//! The arguments and answers of the [`ChannelStore`] operations: what an implementer of a
//! store returns, and what a caller of one matches on.

use core::fmt;

use bitcoin::Amount;

#[cfg(doc)]
use super::{ChannelRecord, ChannelStore, Leased};
use crate::MilliSats;
use crate::channel::ChannelState;

/// The outcome of [`ChannelStore::store_payment`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum StorePayment {
    /// The payment is now the channel's best. `balance` is the new paid − spent.
    Stored {
        /// The balance after the payment.
        balance: MilliSats,
    },
    /// The stored best pays at least as much; nothing changed.
    Stale {
        /// What the stored best pays the server.
        best: Amount,
    },
}

/// The outcome of [`ChannelStore::debit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Debit {
    /// The amount was debited.
    Debited {
        /// paid − spent after the debit ([`ChannelRecord::unspent`]: what nodes hold in
        /// leases counts as unspent).
        balance: MilliSats,
    },
    /// The balance (paid − spent − leased − forfeited) does not cover the amount; nothing
    /// changed.
    Insufficient {
        /// paid − spent ([`ChannelRecord::unspent`]).
        balance: MilliSats,
    },
    /// The channel is not [`ChannelState::Open`]; nothing changed.
    NotOpen {
        /// Its state.
        state: ChannelState,
    },
}

/// A request's claim on an idempotency key, for [`ChannelStore::debit_once`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct IdempotencyClaim {
    /// The client's `Idempotency-Key`: 1 to 255 visible ASCII characters.
    pub key: String,
    /// What identifies the request: the same key with another fingerprint is another request.
    pub fingerprint: [u8; 32],
    /// Now, in milliseconds since the Unix epoch: a record that expires at or before it is
    /// gone.
    pub now: u64,
    /// When the claim lapses if the request is never finished (a node crashed while serving
    /// it), in milliseconds since the Unix epoch: a retry after it runs again.
    pub expires_at: u64,
}

impl IdempotencyClaim {
    /// A claim of `key` for a request with `fingerprint`, made at `now`, lapsing at
    /// `expires_at` (both in milliseconds since the Unix epoch).
    pub fn new(key: impl Into<String>, fingerprint: [u8; 32], now: u64, expires_at: u64) -> Self {
        Self { key: key.into(), fingerprint, now, expires_at }
    }
}

/// What a store keeps for a claimed idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct IdempotencyRecord {
    /// The fingerprint of the request that claimed the key.
    pub fingerprint: [u8; 32],
    /// Its response, as the layer encoded it; `None` while the request is being served.
    pub response: Option<Vec<u8>>,
}

impl IdempotencyRecord {
    /// A record of a request with `fingerprint` and its `response` (`None`: in progress).
    pub fn new(fingerprint: [u8; 32], response: Option<Vec<u8>>) -> Self {
        Self { fingerprint, response }
    }
}

/// The outcome of [`ChannelStore::debit_once`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum DebitOnce {
    /// The key was free: the debit's outcome. The key is claimed if, and only if, it is
    /// [`Debit::Debited`].
    Debit(Debit),
    /// A live record holds the key: nothing was debited or changed.
    Claimed(IdempotencyRecord),
}

/// The id of one lease (see [`Leased`]): unique across nodes and restarts (a random
/// number), so settling a lease twice, or one that expired meanwhile, changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(u64);

impl LeaseId {
    /// The lease with id `id`.
    pub const fn new(id: u64) -> Self {
        Self(id)
    }

    /// A fresh random id.
    pub fn random() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_nanos()),
        );
        Self(hasher.finish())
    }

    /// The id as a number.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A new lease for [`ChannelStore::lease`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeaseTake {
    /// Its id: fresh, or the id of a take of this node's whose outcome it does not know (a
    /// store error): a take with the id of a live lease adds to it and renews its lapse.
    pub id: LeaseId,
    /// The least it may be: the request the node is serving.
    pub least: MilliSats,
    /// The most it may be.
    pub most: MilliSats,
    /// When it lapses unless settled, in milliseconds since the Unix epoch: then
    /// [`expire_leases`](ChannelStore::expire_leases) counts all of it as spent.
    pub expires_at: u64,
}

impl LeaseTake {
    /// A lease `id` of at least `least` and at most `most`, lapsing at `expires_at`
    /// (milliseconds since the Unix epoch).
    pub fn new(id: LeaseId, least: MilliSats, most: MilliSats, expires_at: u64) -> Self {
        Self { id, least, most, expires_at }
    }

    /// What a store grants from `available` ([`ChannelRecord::balance`]): `most`, or half of
    /// `available` if that is less, but never less than `least`; `None` if `available` does
    /// not cover `least`. Half, so that one node never holds the whole balance while
    /// another node's request finds none.
    pub fn grant(&self, available: MilliSats) -> Option<MilliSats> {
        (available >= self.least).then(|| {
            let half = MilliSats::from_msat(available.to_msat() / 2);
            self.most.min(half).max(self.least)
        })
    }
}

/// What [`ChannelStore::lease`] does, in one atomic operation: settles a node's old lease
/// (what it used becomes spent, the rest returns to the balance), then takes a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct LeaseRequest {
    /// A lease to settle, with what the node used of it (at most the lease: more is
    /// counted as the whole lease). Nothing happens if it is gone (settled already, or
    /// expired: then it was all forfeited).
    pub settle: Option<(LeaseId, MilliSats)>,
    /// A lease to take, if the channel is open and its balance covers `least`.
    pub take: Option<LeaseTake>,
}

impl LeaseRequest {
    /// Settles lease `id`, of which `used` was used.
    pub fn settle(id: LeaseId, used: MilliSats) -> Self {
        Self { settle: Some((id, used)), take: None }
    }

    /// Takes lease `take`.
    pub fn take(take: LeaseTake) -> Self {
        Self { settle: None, take: Some(take) }
    }

    /// The same request, also settling lease `id` of which `used` was used (first).
    #[must_use]
    pub fn and_settle(mut self, id: LeaseId, used: MilliSats) -> Self {
        self.settle = Some((id, used));
        self
    }
}

/// The outcome of [`ChannelStore::lease`]. The settlement, if any, happened in every case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Lease {
    /// The new lease holds `amount` (zero without a take).
    Granted {
        /// What the lease holds.
        amount: MilliSats,
        /// What the channel's best payment pays, after the operation.
        paid: MilliSats,
        /// The channel's spent, after the operation.
        spent: MilliSats,
    },
    /// The balance ([`ChannelRecord::balance`]) does not cover the take's `least`: no lease.
    Insufficient {
        /// The balance.
        balance: MilliSats,
    },
    /// The channel is not [`ChannelState::Open`]: no lease.
    NotOpen {
        /// Its state.
        state: ChannelState,
    },
}
