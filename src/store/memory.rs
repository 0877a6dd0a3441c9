use std::future::{Future, Ready as StdReady, ready};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use bitcoin::Transaction;
use dashmap::mapref::entry::Entry;
use dashmap::{DashMap, DashSet};

use super::{
    ChannelRecord, ChannelState, ChannelStore, Debit, DebitOnce, IdempotencyClaim,
    IdempotencyRecord, Lease, LeaseId, LeaseRequest, StoreError, StorePayment,
};
use crate::MilliSats;
use crate::channel::{CheckedPayment, Ledger, server_amount};
use crate::maps::FastMap;
use crate::wire::ChannelId;

type Ready<T> = StdReady<Result<T, StoreError>>;

/// The default store: channels in process memory, in a sharded concurrent map.
///
/// Every operation is atomic under the channel's shard lock. Channels are also indexed by
/// state, so [`list`](ChannelStore::list) costs what the listed state holds, however many
/// channels are settled. Nothing survives a restart:
/// use it for tests, demos and APIs where losing the unsettled payments of a crash is
/// acceptable; otherwise use a durable store. Cloning gives another handle to the same map.
///
/// # Examples
///
/// ```
/// use paychan::store::{ChannelStore, MemoryStore};
/// # use paychan::wire::ChannelId;
/// # async fn demo(id: ChannelId) -> Result<(), paychan::store::StoreError> {
/// let store = MemoryStore::new();
/// assert!(store.load(id).await?.is_none());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct MemoryStore {
    channels: Arc<FastMap<ChannelId, Box<Slot>>>,
    key_index: Arc<AtomicU32>,
    /// Idempotency records by channel and key, with when each expires (ms since the epoch).
    /// Changed under the channel's shard lock (taken first), so a claim is atomic with its
    /// debit.
    idempotency: Arc<DashMap<(ChannelId, String), (IdempotencyRecord, u64)>>,
    /// The channels in each state (by [`ChannelState::ALL`]'s order), changed under the
    /// channel's shard lock (taken first).
    by_state: Arc<[DashSet<ChannelId>; ChannelState::ALL.len()]>,
    /// The idempotency map's size at which it is swept next.
    sweep_at: Arc<std::sync::atomic::AtomicUsize>,
    /// Live leases by channel and id: what each holds and when it lapses (ms since the
    /// epoch). Changed under the channel's shard lock (taken first).
    leases: Arc<DashMap<(ChannelId, LeaseId), (MilliSats, u64)>>,
}

/// How the memory store keeps a channel: boxed, so that the map's free buckets stay small,
/// and with its best payment serialized (one allocation instead of a transaction's many) and
/// what it pays beside it.
#[derive(Debug)]
struct Slot {
    channel: crate::channel::Channel,
    key_index: u32,
    state: ChannelState,
    best: Option<Box<[u8]>>,
    /// What the best pays the server, in sat (its `paid` in msat).
    paid: bitcoin::Amount,
    /// The money, moved only by [`Ledger`]'s methods.
    ledger: Ledger,
    funded_at: u32,
}

impl Slot {
    fn new(record: ChannelRecord) -> Box<Self> {
        Box::new(Self {
            best: record.best.as_ref().map(|tx| bitcoin::consensus::serialize(tx).into()),
            paid: record.paid_amount(),
            ledger: record.ledger(),
            channel: record.channel,
            key_index: record.key_index,
            state: record.state,
            funded_at: record.funded_at,
        })
    }

    fn record(&self) -> ChannelRecord {
        ChannelRecord {
            channel: self.channel.clone(),
            key_index: self.key_index,
            state: self.state,
            // Serialized here from a transaction: it deserializes.
            best: self
                .best
                .as_deref()
                .and_then(|bytes| bitcoin::consensus::deserialize(bytes).ok()),
            spent: self.ledger.spent,
            leased: self.ledger.leased,
            forfeited: self.ledger.forfeited,
            funded_at: self.funded_at,
        }
    }

    /// Makes the payment `encoded`, paying the server `paid`, the best, with `ledger`.
    fn set_best(&mut self, paid: bitcoin::Amount, encoded: Vec<u8>, ledger: Ledger) {
        self.paid = paid;
        self.best = Some(encoded.into());
        self.ledger = ledger;
    }
}

/// `paid` in msat.
fn msat(paid: bitcoin::Amount) -> MilliSats {
    MilliSats::from_sat(paid).unwrap_or(MilliSats::MAX)
}

/// `state`'s place in [`ChannelState::ALL`].
fn slot(state: ChannelState) -> usize {
    ChannelState::ALL.iter().position(|s| *s == state).unwrap_or(0)
}

/// How many idempotency records the memory store keeps at least before it drops the expired
/// ones (then again whenever the map doubled).
const IDEMPOTENCY_SWEEP: usize = 10_000;

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// Creates an empty store.
    ///
    /// Server key indexes start at a random point below 2^30: a restarted server (which keeps
    /// its master key) must not derive a key it already used, or a refund signed before the
    /// restart could serve a channel opened after it.
    pub fn new() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
        let start = u32::try_from(random % (1 << 30)).unwrap_or(0);
        Self::with_first_key_index(start)
    }

    /// Creates an empty store whose first server key index is `index` (for tests that compare
    /// stores; a server uses [`new`](Self::new)).
    pub fn with_first_key_index(index: u32) -> Self {
        Self {
            channels: Arc::default(),
            key_index: Arc::new(AtomicU32::new(index)),
            idempotency: Arc::default(),
            by_state: Arc::default(),
            sweep_at: Arc::default(),
            leases: Arc::default(),
        }
    }

    /// Applies `f` to the channel under its shard lock, keeping the state index.
    fn update<T>(&self, id: ChannelId, f: impl FnOnce(&mut Slot) -> T) -> Ready<T> {
        ready(
            self.channels
                .get_mut(&id)
                .map(|mut record| {
                    let before = record.state;
                    let value = f(&mut record);
                    if record.state != before {
                        self.by_state[slot(before)].remove(&id);
                        self.by_state[slot(record.state)].insert(id);
                    }
                    value
                })
                .ok_or(StoreError::NotFound),
        )
    }
}

impl ChannelStore for MemoryStore {
    fn create(&self, record: ChannelRecord) -> impl Future<Output = Result<(), StoreError>> + Send {
        ready(match self.channels.entry(record.id()) {
            Entry::Occupied(_) => Err(StoreError::AlreadyExists),
            Entry::Vacant(vacant) => {
                let (id, state) = (record.id(), record.state);
                let _locked = vacant.insert(Slot::new(record));
                self.by_state[slot(state)].insert(id);
                Ok(())
            }
        })
    }

    fn load(
        &self,
        id: ChannelId,
    ) -> impl Future<Output = Result<Option<ChannelRecord>, StoreError>> + Send {
        ready(Ok(self.channels.get(&id).map(|slot| slot.record())))
    }

    fn store_payment(
        &self,
        id: ChannelId,
        payment: Transaction,
    ) -> impl Future<Output = Result<StorePayment, StoreError>> + Send {
        self.update(id, move |record| {
            store(record, server_amount(&payment), || bitcoin::consensus::serialize(&payment))
        })
    }

    fn debit(
        &self,
        id: ChannelId,
        amount: MilliSats,
    ) -> impl Future<Output = Result<Debit, StoreError>> + Send {
        self.update(id, move |record| debit(record, amount))
    }

    fn pay(
        &self,
        id: ChannelId,
        payment: CheckedPayment,
        amount: MilliSats,
    ) -> impl Future<Output = Result<Debit, StoreError>> + Send {
        self.update(id, move |record| {
            let _stored_or_stale =
                store(record, payment.server_amount(), || payment.into_encoded());
            debit(record, amount)
        })
    }

    fn close_with(
        &self,
        id: ChannelId,
        payment: CheckedPayment,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        self.update(id, move |record| {
            if !matches!(record.state, ChannelState::Open | ChannelState::Pending) {
                return false;
            }
            let paid = payment.server_amount();
            let Some(ledger) = record.ledger.close_with(msat(paid)) else { return false };
            record.state = ChannelState::Closing;
            record.set_best(paid, payment.into_encoded(), ledger);
            true
        })
    }

    fn debit_once(
        &self,
        id: ChannelId,
        amount: MilliSats,
        claim: &IdempotencyClaim,
    ) -> impl Future<Output = Result<DebitOnce, StoreError>> + Send {
        let records = &self.idempotency;
        // Swept when the map doubled since the last sweep: amortised, not per request.
        let mark = self.sweep_at.load(Ordering::Relaxed).max(IDEMPOTENCY_SWEEP);
        if records.len() >= mark {
            records.retain(|_, (_, expires)| *expires > claim.now);
            self.sweep_at.store(records.len().saturating_mul(2), Ordering::Relaxed);
        }
        self.update(id, |record| match records.entry((id, claim.key.clone())) {
            Entry::Occupied(held) if held.get().1 > claim.now => {
                DebitOnce::Claimed(held.get().0.clone())
            }
            entry => {
                let debit = debit(record, amount);
                if matches!(debit, Debit::Debited { .. }) {
                    let claimed = IdempotencyRecord::new(claim.fingerprint, None);
                    entry.insert_entry((claimed, claim.expires_at));
                }
                DebitOnce::Debit(debit)
            }
        })
    }

    fn finish_once(
        &self,
        id: ChannelId,
        claim: &IdempotencyClaim,
        response: Option<Vec<u8>>,
        expires_at: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        if let Entry::Occupied(mut held) = self.idempotency.entry((id, claim.key.clone()))
            && held.get().0.response.is_none()
            && held.get().1 == claim.expires_at
        {
            match response {
                Some(response) => {
                    let fingerprint = held.get().0.fingerprint;
                    held.insert((IdempotencyRecord::new(fingerprint, Some(response)), expires_at));
                }
                None => drop(held.remove()),
            }
        }
        ready(Ok(()))
    }

    fn credit(
        &self,
        id: ChannelId,
        amount: MilliSats,
    ) -> impl Future<Output = Result<MilliSats, StoreError>> + Send {
        self.update(id, move |record| {
            record.ledger = record.ledger.credit(amount);
            record.ledger.unspent()
        })
    }

    fn lease(
        &self,
        id: ChannelId,
        request: LeaseRequest,
    ) -> impl Future<Output = Result<Lease, StoreError>> + Send {
        let leases = &self.leases;
        self.update(id, move |record| {
            if let Some((lease, used)) = request.settle
                && let Some((_, (held, _))) = leases.remove(&(id, lease))
            {
                record.ledger = record.ledger.settle(held, used);
            }
            let granted = |record: &Slot, amount| Lease::Granted {
                amount,
                paid: record.ledger.paid,
                spent: record.ledger.spent,
            };
            let Some(take) = request.take else { return granted(record, MilliSats::ZERO) };
            if record.state != ChannelState::Open {
                return Lease::NotOpen { state: record.state };
            }
            match take
                .grant(record.ledger.balance())
                .and_then(|amount| record.ledger.lease(amount).map(|ledger| (amount, ledger)))
            {
                Some((amount, ledger)) => {
                    record.ledger = ledger;
                    leases
                        .entry((id, take.id))
                        .and_modify(|(held, until)| {
                            *held = held.saturating_add(amount);
                            *until = take.expires_at;
                        })
                        .or_insert((amount, take.expires_at));
                    granted(record, amount)
                }
                None => Lease::Insufficient { balance: record.ledger.balance() },
            }
        })
    }

    fn expire_leases(
        &self,
        now: u64,
    ) -> impl Future<Output = Result<MilliSats, StoreError>> + Send {
        // The ids first (no lock held), then each under its channel's lock.
        let lapsed: Vec<(ChannelId, LeaseId)> = self
            .leases
            .iter()
            .filter(|entry| entry.value().1 <= now)
            .map(|entry| *entry.key())
            .collect();
        let mut forfeited = MilliSats::ZERO;
        for key in lapsed {
            let counted = self.update(key.0, |record| {
                let removed = self.leases.remove_if(&key, |_, (_, until)| *until <= now);
                removed.map_or(MilliSats::ZERO, |(_, (held, _))| {
                    record.ledger = record.ledger.forfeit(held);
                    held
                })
            });
            if let Ok(held) = counted.into_inner() {
                forfeited = forfeited.saturating_add(held);
            }
        }
        ready(Ok(forfeited))
    }

    fn transition(
        &self,
        id: ChannelId,
        from: ChannelState,
        to: ChannelState,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        if let Err(illegal) = super::legal_move(from, to) {
            return ready(Err(illegal));
        }
        self.update(id, move |record| {
            let matches = record.state == from;
            if matches {
                record.state = to;
            }
            matches
        })
    }

    fn next_key_index(&self) -> impl Future<Output = Result<u32, StoreError>> + Send {
        ready(super::key_index(u64::from(self.key_index.fetch_add(1, Ordering::Relaxed))))
    }

    fn list(
        &self,
        state: ChannelState,
    ) -> impl Future<Output = Result<Vec<ChannelRecord>, StoreError>> + Send {
        // The ids first (no lock held), then each record under its own shard lock.
        let ids: Vec<ChannelId> = self.by_state[slot(state)].iter().map(|id| *id).collect();
        let mut records: Vec<ChannelRecord> = ids
            .iter()
            .filter_map(|id| self.channels.get(id).map(|slot| slot.record()))
            .filter(|record| record.state == state)
            .collect();
        records.sort_by_key(super::expiry_key);
        ready(Ok(records))
    }

    fn count(&self, state: ChannelState) -> impl Future<Output = Result<usize, StoreError>> + Send {
        ready(Ok(self.by_state[slot(state)].len()))
    }
}

/// Makes `payment` the best of `record` if it is open and the payment pays more.
fn store(
    record: &mut Slot,
    paid: bitcoin::Amount,
    encoded: impl FnOnce() -> Vec<u8>,
) -> StorePayment {
    let stale = StorePayment::Stale { best: record.paid };
    if record.state != ChannelState::Open {
        return stale;
    }
    let Some(ledger) = record.ledger.pay(msat(paid)) else { return stale };
    record.set_best(paid, encoded(), ledger);
    StorePayment::Stored { balance: record.ledger.unspent() }
}

/// Debits `amount` from `record` if it is open and its balance covers it.
fn debit(record: &mut Slot, amount: MilliSats) -> Debit {
    if record.state != ChannelState::Open {
        return Debit::NotOpen { state: record.state };
    }
    match record.ledger.debit(amount) {
        Some(ledger) => {
            record.ledger = ledger;
            Debit::Debited { balance: ledger.unspent() }
        }
        None => Debit::Insufficient { balance: record.ledger.unspent() },
    }
}
