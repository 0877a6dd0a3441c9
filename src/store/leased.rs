//! [`Leased`]: a node serves from leases of each channel's balance, at memory speed on a
//! shared store.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bitcoin::Transaction;
use dashmap::DashMap;

use super::{
    ChannelRecord, ChannelState, ChannelStore, Debit, DebitOnce, IdempotencyClaim, Lease, LeaseId,
    LeaseRequest, LeaseTake, StoreError, StorePayment, now_ms,
};
use crate::MilliSats;
use crate::channel::CheckedPayment;
use crate::wire::ChannelId;

/// How a [`Leased`] store sizes its leases and when it gives them back.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use paychan::MilliSats;
/// use paychan::store::LeaseConfig;
///
/// let config = LeaseConfig::default()
///     .horizon(Duration::from_millis(250))
///     .max_lease(MilliSats::from_msat(20_000));
/// assert_eq!(config.max_lease_amount(), MilliSats::from_msat(20_000));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    horizon: Duration,
    max_lease: MilliSats,
    idle: Duration,
    ttl: Duration,
}

impl Default for LeaseConfig {
    /// Leases of 100 ms of a channel's traffic on the node, at most 100 sat, given back after
    /// 1 s unused, lapsing 30 s after they were taken.
    fn default() -> Self {
        Self {
            horizon: Duration::from_millis(100),
            max_lease: MilliSats::from_msat(100_000),
            idle: Duration::from_secs(1),
            ttl: Duration::from_secs(30),
        }
    }
}

impl LeaseConfig {
    /// A lease covers about this much of the channel's traffic on this node, measured from
    /// how fast it used its last lease: one store operation per `horizon` per busy channel.
    #[must_use]
    pub fn horizon(mut self, horizon: Duration) -> Self {
        self.horizon = horizon;
        self
    }

    /// No lease holds more than this (unless one request costs more): what a node crash can
    /// leave unserved of a channel's balance, per node.
    #[must_use]
    pub fn max_lease(mut self, max: MilliSats) -> Self {
        self.max_lease = max;
        self
    }

    /// A lease unused this long is given back (settled): its balance serves other nodes
    /// again, and a fair close need not pay for it.
    #[must_use]
    pub fn idle(mut self, idle: Duration) -> Self {
        self.idle = idle;
        self
    }

    /// A lease not settled this long after it was taken lapses: its node is taken for dead
    /// and all of it counts as spent. Live nodes settle and renew their leases after a
    /// third of it. At least 3 seconds.
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl.max(Duration::from_secs(3));
        self
    }

    /// The largest lease.
    pub fn max_lease_amount(&self) -> MilliSats {
        self.max_lease
    }

    /// How long a lease lives unsettled.
    pub fn ttl_duration(&self) -> Duration {
        self.ttl
    }
}

/// A [`ChannelStore`] whose debits a node serves from **leases**: it takes part of a channel's
/// balance in one atomic store operation ([`ChannelStore::lease`]) and debits from it in its
/// own memory, so the fast path of a paid request costs no store round trip. For API nodes
/// sharing PostgreSQL or Redis.
///
/// - **Exact.** A lease is taken from the balance before anything is served from it, so what
///   all nodes serve never exceeds what was paid, at any moment. Concurrent requests on one
///   node draw from its lease under a lock.
/// - **Sized by traffic.** A lease is what the channel used on this node in
///   [`horizon`](LeaseConfig::horizon) (measured from the last lease), at least the request
///   and at most [`max_lease`](LeaseConfig::max_lease) — and at most half the channel's free
///   balance, so one node never holds it all while another node's request finds none.
/// - **Given back.** A lease is settled (what was used becomes spent, the rest is free again)
///   when it runs out, after [`idle`](LeaseConfig::idle) unused, when this node closes the
///   channel, and by [`return_all`](Self::return_all) on shutdown.
/// - **A crash** leaves the dead node's leases unsettled: after
///   [`ttl`](LeaseConfig::ttl) any node counts each as **all spent**
///   ([`expire_leases`](ChannelStore::expire_leases)) — what the dead node served of it
///   cannot be known, and counting less could serve unpaid work. So a crash costs each
///   channel at most one lease per dead node (≤ `max_lease`, and about `horizon` of its
///   traffic).
/// - **The client's view.** Balances reported to clients (`Payment-Channel-Balance`,
///   receipts) count leases as unspent until they are settled: never below the true balance,
///   so a client watching for overcharges is not misled. A refusal's snapshot reports what
///   is leased (`leased_msat`), and a fair close must pay for it, unless the leases are given
///   back first: a close on this node settles its own lease and waits up to twice
///   [`idle`](LeaseConfig::idle) for the others'.
///
/// New payments, idempotent requests and everything else go to the store directly.
///
/// Needs a tokio runtime (a background task gives back idle leases and expires lapsed ones).
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use paychan::store::{ChannelStore, Leased, MemoryStore};
///
/// // On many nodes this wraps a PostgresStore or a RedisStore.
/// let store = Leased::new(MemoryStore::new());
/// // … serve with it: `Merchant::with_store(store.clone())`, then on shutdown:
/// store.return_all().await;
/// # }
/// ```
#[derive(Debug)]
pub struct Leased<S> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for Leased<S> {
    fn clone(&self) -> Self {
        Self { inner: Arc::clone(&self.inner) }
    }
}

#[derive(Debug)]
struct Inner<S> {
    store: S,
    config: LeaseConfig,
    slots: DashMap<ChannelId, Arc<Slot>>,
    /// The background task, started with the first lease.
    task: std::sync::OnceLock<tokio::task::AbortHandle>,
}

impl<S> Drop for Inner<S> {
    fn drop(&mut self) {
        if let Some(task) = self.task.get() {
            task.abort();
        }
    }
}

/// This node's lease of one channel.
#[derive(Debug, Default)]
struct Slot {
    local: Mutex<Local>,
    /// Held while the lease is replaced or settled: one store operation at a time.
    refill: tokio::sync::Mutex<()>,
}

impl Slot {
    fn local(&self) -> MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Local {
    /// The live lease, if any.
    lease: Option<LeaseId>,
    /// What it holds.
    held: MilliSats,
    /// What was used of it.
    used: MilliSats,
    /// paid − spent when it was taken.
    unspent: MilliSats,
    /// When it was taken.
    taken: Option<Instant>,
    /// When it was last drawn from (or the slot made).
    last: Option<Instant>,
}

impl Local {
    /// Draws `amount` from the lease if it holds enough: the balance to report.
    fn draw(&mut self, amount: MilliSats, now: Instant) -> Option<MilliSats> {
        self.lease?;
        let left = self.held.checked_sub(self.used)?;
        left.checked_sub(amount)?;
        self.used = self.used.saturating_add(amount);
        self.last = Some(now);
        Some(self.unspent.saturating_sub(self.used))
    }

    /// Stops draws from the lease (until it is put back), returning it as it was.
    fn take(&mut self) -> Self {
        let taken = *self;
        self.lease = None;
        taken
    }

    /// What the next lease should hold, for a request of `amount`: the rate the last lease
    /// was used at, over the horizon.
    fn want(&self, amount: MilliSats, config: &LeaseConfig, now: Instant) -> MilliSats {
        let by_rate = self.taken.filter(|_| !self.used.is_zero()).map_or(amount, |taken| {
            let elapsed = now.duration_since(taken).max(Duration::from_millis(1)).as_micros();
            let per_horizon =
                u128::from(self.used.to_msat()) * config.horizon.as_micros() / elapsed;
            MilliSats::from_msat(u64::try_from(per_horizon).unwrap_or(u64::MAX))
        });
        by_rate.min(config.max_lease).max(amount)
    }
}

impl<S: ChannelStore> Leased<S> {
    /// Wraps `store` with the default [`LeaseConfig`].
    pub fn new(store: S) -> Self {
        Self::with_config(store, LeaseConfig::default())
    }

    /// Wraps `store` with `config`.
    pub fn with_config(store: S, config: LeaseConfig) -> Self {
        let inner =
            Inner { store, config, slots: DashMap::new(), task: std::sync::OnceLock::new() };
        Self { inner: Arc::new(inner) }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner.store
    }

    /// The configuration.
    pub fn config(&self) -> &LeaseConfig {
        &self.inner.config
    }

    /// What this node holds in live leases, over all channels, and what it used of them.
    pub fn held(&self) -> (MilliSats, MilliSats) {
        self.inner.slots.iter().fold((MilliSats::ZERO, MilliSats::ZERO), |(held, used), slot| {
            let local = slot.local();
            match local.lease {
                Some(_) => (held.saturating_add(local.held), used.saturating_add(local.used)),
                None => (held, used),
            }
        })
    }

    /// Settles every lease this node holds: call it on shutdown, after the last request was
    /// served. Returns how many leases could not be settled (the store failed): those lapse
    /// after the [`ttl`](LeaseConfig::ttl), counted as spent.
    pub async fn return_all(&self) -> usize {
        let ids: Vec<ChannelId> = self.inner.slots.iter().map(|slot| *slot.key()).collect();
        let mut failed = 0;
        for id in ids {
            if let Err(error) = self.inner.settle(id).await {
                tracing::warn!(%error, channel = %id, "a lease could not be given back");
                failed += 1;
            }
        }
        failed
    }
}

impl<S: ChannelStore> Inner<S> {
    /// This node's slot of channel `id`.
    fn slot(&self, id: ChannelId) -> Arc<Slot> {
        if let Some(slot) = self.slots.get(&id) {
            return Arc::clone(&slot);
        }
        let slot = self.slots.entry(id).or_insert_with(|| {
            let slot = Slot::default();
            slot.local().last = Some(Instant::now());
            Arc::new(slot)
        });
        Arc::clone(&slot)
    }

    /// Debits `amount` from this node's lease of channel `id`, taking a new lease (and
    /// settling the old one) when it does not hold enough.
    async fn debit(
        self: &Arc<Self>,
        id: ChannelId,
        amount: MilliSats,
    ) -> Result<Debit, StoreError> {
        let slot = self.slot(id);
        if let Some(balance) = slot.local().draw(amount, Instant::now()) {
            return Ok(Debit::Debited { balance });
        }
        let _refill = slot.refill.lock().await;
        let now = Instant::now();
        let old = {
            let mut local = slot.local();
            if let Some(balance) = local.draw(amount, now) {
                return Ok(Debit::Debited { balance });
            }
            // Nothing draws from a lease being settled: what it used is final here.
            local.take()
        };
        let ttl = u64::try_from(self.config.ttl.as_millis()).unwrap_or(u64::MAX);
        let take = LeaseTake::new(
            LeaseId::random(),
            amount,
            old.want(amount, &self.config, now),
            now_ms().saturating_add(ttl),
        );
        let request = match old.lease {
            Some(lease) => LeaseRequest::take(take).and_settle(lease, old.used),
            None => LeaseRequest::take(take),
        };
        self.start();
        let lease = match self.store.lease(id, request).await {
            Ok(lease) => lease,
            Err(error) => {
                // The old lease stays (settling it again later is harmless).
                slot.local().lease = old.lease;
                return Err(error);
            }
        };
        let mut local = slot.local();
        match lease {
            Lease::Granted { amount: held, unspent } => {
                *local = Local {
                    lease: Some(take.id),
                    held,
                    used: amount,
                    unspent,
                    taken: Some(now),
                    last: Some(now),
                };
                Ok(Debit::Debited { balance: unspent.saturating_sub(amount) })
            }
            Lease::Insufficient { balance } => {
                *local = Local { last: Some(now), ..Local::default() };
                Ok(Debit::Insufficient { balance })
            }
            Lease::NotOpen { state } => {
                *local = Local { last: Some(now), ..Local::default() };
                Ok(Debit::NotOpen { state })
            }
        }
    }

    /// Settles this node's lease of channel `id`, if it holds one.
    async fn settle(&self, id: ChannelId) -> Result<(), StoreError> {
        let Some(slot) = self.slots.get(&id).map(|slot| Arc::clone(&slot)) else { return Ok(()) };
        let _refill = slot.refill.lock().await;
        let held = slot.local().take();
        let Some(lease) = held.lease else { return Ok(()) };
        if let Err(error) = self.store.lease(id, LeaseRequest::settle(lease, held.used)).await {
            slot.local().lease = Some(lease);
            return Err(error);
        }
        *slot.local() = Local { last: held.last, ..Local::default() };
        Ok(())
    }

    /// Starts the background task once, if there is a runtime.
    fn start(self: &Arc<Self>) {
        if self.task.get().is_some() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let weak = Arc::downgrade(self);
        let _ = self.task.get_or_init(|| runtime.spawn(background(weak)).abort_handle());
    }

    /// Settles the leases unused for `idle` or older than a third of the ttl, and forgets
    /// idle channels without a lease.
    async fn sweep(&self, now: Instant) {
        let (idle, old) = (self.config.idle, self.config.ttl / 3);
        let due: Vec<ChannelId> = self
            .slots
            .iter()
            .filter(|slot| {
                let local = slot.local();
                let unused = local.last.is_none_or(|last| now.duration_since(last) >= idle);
                let aged = local.taken.is_some_and(|taken| now.duration_since(taken) >= old);
                local.lease.is_some() && (unused || aged)
            })
            .map(|slot| *slot.key())
            .collect();
        for id in due {
            if let Err(error) = self.settle(id).await {
                tracing::warn!(%error, channel = %id, "a lease could not be given back yet");
            }
        }
        // Under the map's lock, so nobody takes the slot meanwhile.
        self.slots.retain(|_, slot| {
            let local = slot.local();
            let unused = local.last.is_none_or(|last| now.duration_since(last) >= idle);
            Arc::strong_count(slot) > 1 || local.lease.is_some() || !unused
        });
    }
}

/// Gives back idle leases and expires lapsed ones, until the store is dropped.
async fn background<S: ChannelStore>(weak: Weak<Inner<S>>) {
    let Some(config) = weak.upgrade().map(|inner| inner.config) else { return };
    let tick = (config.idle / 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let expire_every = config.ttl / 2;
    let mut expired = Instant::now();
    loop {
        tokio::time::sleep(tick).await;
        let Some(inner) = weak.upgrade() else { return };
        let now = Instant::now();
        inner.sweep(now).await;
        if now.duration_since(expired) >= expire_every {
            expired = now;
            match inner.store.expire_leases(now_ms()).await {
                Ok(forfeited) if !forfeited.is_zero() => {
                    tracing::warn!(%forfeited, "lapsed leases (of nodes that died) counted as spent");
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "lapsed leases could not be expired"),
            }
        }
    }
}

impl<S: ChannelStore> ChannelStore for Leased<S> {
    fn create(&self, record: ChannelRecord) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.inner.store.create(record)
    }

    fn load(
        &self,
        id: ChannelId,
    ) -> impl Future<Output = Result<Option<ChannelRecord>, StoreError>> + Send {
        self.inner.store.load(id)
    }

    fn store_payment(
        &self,
        id: ChannelId,
        payment: Transaction,
    ) -> impl Future<Output = Result<StorePayment, StoreError>> + Send {
        self.inner.store.store_payment(id, payment)
    }

    /// Debits from this node's lease of the channel (see [`Leased`]).
    fn debit(
        &self,
        id: ChannelId,
        amount: MilliSats,
    ) -> impl Future<Output = Result<Debit, StoreError>> + Send {
        let inner = Arc::clone(&self.inner);
        async move { inner.debit(id, amount).await }
    }

    fn pay(
        &self,
        id: ChannelId,
        payment: CheckedPayment,
        amount: MilliSats,
    ) -> impl Future<Output = Result<Debit, StoreError>> + Send {
        self.inner.store.pay(id, payment, amount)
    }

    /// Settles this node's lease of the channel first, then waits (up to twice
    /// [`idle`](LeaseConfig::idle)) for other nodes to give theirs back while `payment`
    /// covers what was spent but not what is leased.
    fn close_with(
        &self,
        id: ChannelId,
        payment: CheckedPayment,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let inner = Arc::clone(&self.inner);
        async move {
            inner.settle(id).await?;
            let offered = MilliSats::from_sat(payment.server_amount()).unwrap_or(MilliSats::MAX);
            let deadline = Instant::now() + inner.config.idle * 2;
            loop {
                if inner.store.close_with(id, payment.clone()).await? {
                    return Ok(true);
                }
                let record = inner.store.load(id).await?.ok_or(StoreError::NotFound)?;
                let open = matches!(record.state, ChannelState::Open | ChannelState::Pending);
                if !open || record.leased.is_zero() || record.spent > offered {
                    return Ok(false);
                }
                if Instant::now() >= deadline {
                    return Ok(false);
                }
                let _forfeited = inner.store.expire_leases(now_ms()).await?;
                tokio::time::sleep((inner.config.idle / 8).max(Duration::from_millis(5))).await;
            }
        }
    }

    fn debit_once(
        &self,
        id: ChannelId,
        amount: MilliSats,
        claim: &IdempotencyClaim,
    ) -> impl Future<Output = Result<DebitOnce, StoreError>> + Send {
        self.inner.store.debit_once(id, amount, claim)
    }

    fn finish_once(
        &self,
        id: ChannelId,
        key: &str,
        response: Option<Vec<u8>>,
        expires_at: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.inner.store.finish_once(id, key, response, expires_at)
    }

    /// Gives back to this node's lease when it used at least `amount` of it (the debit
    /// being given back was drawn from it, or an equal one was); otherwise to the store.
    fn credit(
        &self,
        id: ChannelId,
        amount: MilliSats,
    ) -> impl Future<Output = Result<MilliSats, StoreError>> + Send {
        let inner = Arc::clone(&self.inner);
        async move {
            if let Some(slot) = inner.slots.get(&id).map(|slot| Arc::clone(&slot)) {
                let mut local = slot.local();
                if local.lease.is_some() && local.used >= amount {
                    local.used = local.used.saturating_sub(amount);
                    return Ok(local.unspent.saturating_sub(local.used));
                }
            }
            inner.store.credit(id, amount).await
        }
    }

    fn lease(
        &self,
        id: ChannelId,
        request: LeaseRequest,
    ) -> impl Future<Output = Result<Lease, StoreError>> + Send {
        self.inner.store.lease(id, request)
    }

    fn expire_leases(
        &self,
        now: u64,
    ) -> impl Future<Output = Result<MilliSats, StoreError>> + Send {
        self.inner.store.expire_leases(now)
    }

    /// Settles this node's lease of the channel first when it leaves
    /// [`Open`](ChannelState::Open).
    fn transition(
        &self,
        id: ChannelId,
        from: ChannelState,
        to: ChannelState,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let inner = Arc::clone(&self.inner);
        async move {
            if from == ChannelState::Open && to != ChannelState::Open {
                inner.settle(id).await?;
            }
            inner.store.transition(id, from, to).await
        }
    }

    fn next_key_index(&self) -> impl Future<Output = Result<u32, StoreError>> + Send {
        self.inner.store.next_key_index()
    }

    fn list(
        &self,
        state: ChannelState,
    ) -> impl Future<Output = Result<Vec<ChannelRecord>, StoreError>> + Send {
        self.inner.store.list(state)
    }

    fn count(&self, state: ChannelState) -> impl Future<Output = Result<usize, StoreError>> + Send {
        self.inner.store.count(state)
    }
}
