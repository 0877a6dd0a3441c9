//! [`Leased`]: a node serves from leases of each channel's balance, at memory speed on a
//! shared store.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bitcoin::Transaction;

use super::{
    ChannelRecord, ChannelState, ChannelStore, Debit, DebitOnce, IdempotencyClaim, Lease, LeaseId,
    LeaseRequest, LeaseTake, StoreError, StorePayment, now_ms,
};
use crate::MilliSats;
use crate::channel::CheckedPayment;
use crate::maps::FastMap;
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
///     .with_horizon(Duration::from_millis(250))
///     .with_max_lease(MilliSats::from_msat(20_000));
/// assert_eq!(config.max_lease(), MilliSats::from_msat(20_000));
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
    /// The shortest [`ttl`](Self::ttl).
    pub const MIN_TTL: Duration = Duration::from_secs(10);
    /// The longest [`ttl`](Self::ttl).
    pub const MAX_TTL: Duration = Duration::from_secs(86_400);

    /// A lease covers about this much of the channel's traffic on this node, measured from
    /// how fast it used its last lease: one store operation per `horizon` per busy channel.
    #[must_use]
    pub fn with_horizon(mut self, horizon: Duration) -> Self {
        self.horizon = horizon;
        self
    }

    /// No lease holds more than this (unless one request costs more): what a node crash can
    /// leave unserved of a channel's balance, per node.
    #[must_use]
    pub fn with_max_lease(mut self, max: MilliSats) -> Self {
        self.max_lease = max;
        self
    }

    /// A lease unused this long is given back (settled): its balance serves other nodes
    /// again, and a fair close need not pay for it (a fair close waits up to twice this,
    /// at most a minute, for other nodes' leases).
    #[must_use]
    pub fn with_idle(mut self, idle: Duration) -> Self {
        self.idle = idle;
        self
    }

    /// A lease not settled this long after it was taken lapses: its node is taken for dead
    /// and all of it is forfeited. Live nodes settle and renew their leases after a third
    /// of it, so the nodes' clocks must agree within a third of it. Between 10 seconds and a
    /// day; a store call on a lease is given up after a quarter of it.
    #[must_use]
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl.clamp(Self::MIN_TTL, Self::MAX_TTL);
        self
    }

    /// The largest lease.
    pub fn max_lease(&self) -> MilliSats {
        self.max_lease
    }

    /// How long a lease lives unsettled.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

/// A [`ChannelStore`] whose debits a node serves from **leases**: it takes part of a channel's
/// balance in one atomic store operation ([`ChannelStore::lease`]) and debits from it in its
/// own memory, so the fast path of a paid request costs no store round trip. For API nodes
/// sharing PostgreSQL or Redis.
///
/// - **Exact.** A lease is taken from the balance before anything is served from it, so what
///   all nodes serve never exceeds what was paid. Concurrent requests on one node draw from
///   its lease under a lock. A lease operation runs to its end even if the request that
///   started it is dropped, and after a store error (which may hide an operation that did
///   happen) nothing is drawn from the lease it concerned again: the next operation settles
///   it (settling is idempotent) and takes the lease of unknown outcome again under the same
///   id, so a grant the node did not hear of is given back, not lapsed.
/// - **Sized by traffic.** A lease is what the channel used on this node in
///   [`with_horizon`](LeaseConfig::with_horizon) (measured from the last lease), at least the request
///   and at most [`with_max_lease`](LeaseConfig::with_max_lease) — and at most half the channel's free
///   balance, so one node never holds it all while another node's request finds none. A
///   request may still be refused (402) while part of the balance sits in another node's
///   lease: the client tops up, or the lease comes back when idle.
/// - **Given back.** A lease is settled (what was used becomes spent, the rest is free again)
///   when it no longer covers a request, after [`with_idle`](LeaseConfig::with_idle) unused, after a
///   third of its [`with_ttl`](LeaseConfig::with_ttl) (renewed), when this node closes the channel,
///   and by [`return_all`](Self::return_all) on shutdown.
/// - **A crash** leaves the dead node's leases unsettled: after their
///   [`with_ttl`](LeaseConfig::with_ttl) any node **forfeits** each
///   ([`expire_leases`](ChannelStore::expire_leases)): what the dead node served of it
///   cannot be known, so all of it is kept from the balance for good (never served unpaid),
///   though not reported as spent. A crash costs each channel at most one lease per dead
///   node (≤ `max_lease`, and about `horizon` of its traffic there), and a fair close pays
///   it. The nodes' clocks must agree within a third of the ttl.
/// - **The client's view.** Balances reported to clients (`Payment-Channel-Balance`,
///   receipts) are paid − spent − this node's use of its lease: other nodes' unsettled use
///   and what was forfeited count as unspent, and a top-up counts as soon as this node
///   stored it or read the channel (as the layer does before serving a new payment). They are
///   never below the true balance, so a client watching for overcharges is not misled. A
///   refusal's snapshot counts what is leased and forfeited in `spent_msat` (and reports it
///   as `leased_msat`): a fair close must pay for it, unless the leases are given back
///   first — a close on this node settles its own lease and waits up to twice
///   [`with_idle`](LeaseConfig::with_idle) for the others'.
/// - **Stops with its channel.** A node draws on its lease of a channel only until it sees
///   the channel out of [`Open`](ChannelState::Open): suspended (a zero-conf funding left
///   the mempool), closing or failed. It sees that at once when it moves the channel itself
///   ([`transition`](ChannelStore::transition), [`close_with`](ChannelStore::close_with)),
///   in every record it reads ([`load`](ChannelStore::load), [`list`](ChannelStore::list)),
///   and when a listing of the open channels leaves out one it holds a lease of, taken
///   before the listing began (it then reads that record again). The lease is then settled
///   like one of unknown outcome, and a lease being granted meanwhile is given back unused
///   and its request refused. The [settlement task](crate::settlement::Settlement) lists
///   every state on every pass: run on this store on every node (as
///   [`Merchant`](crate::Merchant) does), **no request is served from any node's lease of a
///   channel that left open once each node has run one settlement pass that began after the
///   change** (a pass during which the store failed may not count; one whose chain backend is
///   down still lists the open channels) — within one pass
///   interval of the change, plus the pass itself. Until its pass a node may serve from the
///   lease it holds (at most one per node, ≤ [`with_max_lease`](LeaseConfig::with_max_lease)), and
///   from none taken more than about a third of the [`with_ttl`](LeaseConfig::with_ttl) before (the
///   background task gives it back then, and the store grants nothing on a channel that is
///   not open). None of this costs the fast path anything: no store round trip per request.
///
/// New payments, idempotent requests and everything else go to the store directly.
///
/// Needs a tokio runtime: lease operations run as tasks, and a background task (on the
/// runtime of the first lease) gives back idle leases and forfeits lapsed ones.
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
    slots: FastMap<ChannelId, Arc<Slot>>,
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
    /// The live lease draws come from, if any.
    lease: Option<LeaseId>,
    /// What it holds.
    held: MilliSats,
    /// What was used of it.
    used: MilliSats,
    /// The most the channel's payments pay that this node knows of.
    paid: MilliSats,
    /// The channel's spent as the store last reported it (this lease's use excluded).
    spent: MilliSats,
    /// When it was taken.
    taken: Option<Instant>,
    /// When it was last drawn from (or the slot made).
    last: Option<Instant>,
    /// A lease whose settlement may not have happened (the store failed): settled again by
    /// the next operation (settling is idempotent); never drawn from again.
    unsettled: Option<(LeaseId, MilliSats)>,
    /// The id of a take whose outcome is unknown (the store failed): the next take reuses
    /// it, so a grant that did happen merges into the new lease instead of lapsing.
    retake: Option<LeaseId>,
    /// A store operation on the lease is in flight.
    busy: bool,
    /// Debits given back while an operation was in flight: given back to the store after it.
    owed: MilliSats,
    /// The channel was seen out of [`Open`](ChannelState::Open) (in this state) while an
    /// operation was in flight: a lease it was granted is not drawn from.
    stopped: Option<ChannelState>,
}

impl Local {
    /// Draws `amount` from the lease if it holds enough: the balance to report.
    fn draw(&mut self, amount: MilliSats, now: Instant) -> Option<MilliSats> {
        self.lease?;
        let left = self.held.checked_sub(self.used)?;
        left.checked_sub(amount)?;
        self.used = self.used.saturating_add(amount);
        self.last = Some(now);
        Some(self.balance())
    }

    /// Takes in the store's answer to a lease `take` (drawing `amount` at once) that settled
    /// `settle` of `old`, the slot as it was before: the slot after it and the debit to
    /// report.
    fn granted(
        &mut self,
        lease: Lease,
        old: Local,
        settle: Option<(LeaseId, MilliSats)>,
        take: LeaseId,
        amount: MilliSats,
        now: Instant,
    ) -> Debit {
        let (paid, spent) = (self.paid, self.spent);
        // Refused: the old lease was settled; a take of unknown outcome may still hold a
        // grant, settled (unused) by the next operation.
        let refused = Local {
            paid,
            spent: spent.saturating_add(settle.map_or(MilliSats::ZERO, |(_, used)| used)),
            last: Some(now),
            unsettled: old.retake.map(|lease| (lease, MilliSats::ZERO)),
            ..Local::default()
        };
        match (lease, self.stopped) {
            // The channel was seen out of open while the lease was taken: the grant is
            // given back unused (by the next operation) and the request refused, as the
            // store would refuse it now.
            (Lease::Granted { paid: now_paid, spent, .. }, Some(state)) => {
                *self = Local {
                    paid: paid.max(now_paid),
                    spent,
                    last: Some(now),
                    unsettled: Some((take, MilliSats::ZERO)),
                    ..Local::default()
                };
                Debit::NotOpen { state }
            }
            (Lease::Granted { amount: held, paid: now_paid, spent }, None) => {
                *self = Local {
                    lease: Some(take),
                    held,
                    used: amount,
                    paid: paid.max(now_paid),
                    spent,
                    taken: Some(now),
                    last: Some(now),
                    ..Local::default()
                };
                Debit::Debited { balance: self.balance() }
            }
            (Lease::Insufficient { balance }, _) => {
                *self = refused;
                Debit::Insufficient { balance }
            }
            (Lease::NotOpen { state }, _) => {
                *self = refused;
                Debit::NotOpen { state }
            }
        }
    }

    /// The balance to report: paid − spent − what this node used (other nodes' unsettled
    /// use counts as unspent: never less than the true balance).
    fn balance(&self) -> MilliSats {
        self.paid.saturating_sub(self.spent).saturating_sub(self.used)
    }

    /// Starts a store operation: no draws until it is done. The lease to settle (the live
    /// one, or one whose settlement is unknown) with what was used of it.
    fn begin(&mut self) -> Option<(LeaseId, MilliSats)> {
        self.busy = true;
        // What the store answers from now on is newer than what stopped the slot.
        self.stopped = None;
        let live = self.lease.take().map(|lease| (lease, self.used));
        live.or(self.unsettled)
    }

    /// The channel is in `state`, not [`Open`](ChannelState::Open): nothing is drawn from the
    /// live lease again (the next operation settles it, as one of unknown outcome), nor from
    /// one an operation in flight is being granted.
    fn stop(&mut self, state: ChannelState) {
        if let Some(lease) = self.lease.take() {
            // A live lease and one of unknown settlement never coexist: `begin` settles
            // either, and every operation's end leaves at most one of them.
            debug_assert!(self.unsettled.is_none(), "a live lease beside an unsettled one");
            self.unsettled = Some((lease, self.used));
        }
        if self.busy {
            self.stopped = Some(state);
        }
    }

    /// The store operation that settled `settled` (and took `taken`) failed: nothing is
    /// drawn from either again until a later operation settles them.
    fn failed(&mut self, settled: Option<(LeaseId, MilliSats)>, taken: Option<LeaseId>) {
        self.busy = false;
        self.lease = None;
        self.unsettled = settled;
        if taken.is_some() {
            self.retake = taken;
        }
    }

    /// What the next lease should hold, for a request of `amount`: the rate the last lease
    /// was used at, over the horizon.
    fn want(&self, amount: MilliSats, config: &LeaseConfig, now: Instant) -> MilliSats {
        let by_rate = self.taken.filter(|_| !self.used.is_zero()).map_or(amount, |taken| {
            let elapsed = now.duration_since(taken).max(Duration::from_millis(1)).as_micros();
            let per_horizon = u128::from(self.used.to_msat())
                .saturating_mul(config.horizon.as_micros())
                / elapsed;
            MilliSats::from_msat(u64::try_from(per_horizon).unwrap_or(u64::MAX))
        });
        by_rate.min(config.max_lease).max(amount)
    }
}

/// A store operation on a slot's lease in flight ([`Local::begin`]) until it is
/// [`done`](Self::done). Dropped before that (the task panicked, or the runtime shut down
/// under it), the operation counts as failed ([`Local::failed`]): nothing is drawn from what
/// it was settling or taking, and the next operation settles both. The slot is never left
/// busy, which would keep the sweep from settling it and park refunds for good.
struct InFlight<'a> {
    slot: &'a Slot,
    settle: Option<(LeaseId, MilliSats)>,
    take: Option<LeaseId>,
    done: bool,
}

impl InFlight<'_> {
    /// The operation ended (and its outcome is written into the slot).
    fn done(mut self) {
        self.done = true;
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.slot.local().failed(self.settle, self.take);
        }
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
            Inner { store, config, slots: FastMap::default(), task: std::sync::OnceLock::new() };
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
    /// served. Returns how many channels' leases could not be settled (the store failed):
    /// those lapse after the [`with_ttl`](LeaseConfig::with_ttl), forfeited.
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

/// Runs `work` to its end even if the caller goes away (a client disconnects mid-request):
/// a store operation on a lease and its write-back are never cut in two.
async fn uncancelled<T: Send + 'static>(
    work: impl Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => runtime.spawn(work).await.map_err(StoreError::unavailable)?,
        // No runtime to hand it to: run it here.
        Err(_) => work.await,
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

    /// Notes that channel `id`'s payments pay at least `paid` (a payment this node stored or
    /// a record it read), so that balances reported after a top-up count it.
    fn saw_paid(&self, id: ChannelId, paid: MilliSats) {
        if let Some(slot) = self.slots.get(&id) {
            let mut local = slot.local();
            local.paid = local.paid.max(paid);
        }
    }

    /// Notes that channel `id` is in `state`, as a record read from the store says: out of
    /// [`Open`](ChannelState::Open), this node stops drawing on its lease of it.
    fn saw_state(&self, id: ChannelId, state: ChannelState) {
        if state != ChannelState::Open
            && let Some(slot) = self.slots.get(&id)
        {
            slot.local().stop(state);
        }
    }

    /// `open` lists every open channel, as read by a listing that began at `began`: a
    /// channel this node holds a lease of that was taken before, or is being taken, and is
    /// not in the list, left open since. Each is read again (a channel may also have opened
    /// after the listing) and its lease stopped if it is not open.
    async fn saw_open(&self, began: Instant, open: &[ChannelRecord]) {
        if self.slots.is_empty() {
            return;
        }
        let open: HashSet<ChannelId> = open.iter().map(ChannelRecord::id).collect();
        let left: Vec<ChannelId> = self
            .slots
            .iter()
            .filter(|slot| {
                let local = slot.local();
                let leased = local.lease.is_some() && local.taken.is_some_and(|at| at < began);
                (leased || local.busy) && !open.contains(slot.key())
            })
            .map(|slot| *slot.key())
            .collect();
        for id in left {
            match self.bounded(self.store.load(id)).await {
                Ok(Some(record)) => self.saw_state(id, record.state),
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(%error, channel = %id, "the state of a leased channel is unknown");
                }
            }
        }
    }

    /// Debits `amount` from this node's lease of channel `id`, taking a new lease (and
    /// settling the old one) when it does not hold enough.
    async fn debit(
        self: &Arc<Self>,
        id: ChannelId,
        amount: MilliSats,
    ) -> Result<Debit, StoreError> {
        if amount.is_zero() {
            // Nothing to lease: the store says whether the channel is open.
            return self.store.debit(id, amount).await;
        }
        let slot = self.slot(id);
        if let Some(balance) = slot.local().draw(amount, Instant::now()) {
            return Ok(Debit::Debited { balance });
        }
        self.start();
        let inner = Arc::clone(self);
        uncancelled(async move { inner.refill(id, &slot, amount).await }).await
    }

    /// The slow path of [`debit`](Self::debit): under the slot's lock, draws from a lease
    /// another request took meanwhile, or settles the old lease and takes a new one.
    async fn refill(
        &self,
        id: ChannelId,
        slot: &Slot,
        amount: MilliSats,
    ) -> Result<Debit, StoreError> {
        let _refill = slot.refill.lock().await;
        let now = Instant::now();
        let (settle, old) = {
            let mut local = slot.local();
            if let Some(balance) = local.draw(amount, now) {
                return Ok(Debit::Debited { balance });
            }
            let old = *local;
            (local.begin(), old)
        };
        let ttl = u64::try_from(self.config.ttl.as_millis()).unwrap_or(u64::MAX);
        let take = LeaseTake::new(
            old.retake.unwrap_or_else(LeaseId::random),
            amount,
            old.want(amount, &self.config, now),
            now_ms().saturating_add(ttl),
        );
        let in_flight = InFlight { slot, settle, take: Some(take.id), done: false };
        let request = match settle {
            Some((lease, used)) => LeaseRequest::take(take).and_settle(lease, used),
            None => LeaseRequest::take(take),
        };
        let lease =
            self.bounded(self.store.lease(id, request)).await.and_then(|lease| match lease {
                // A store that grants less than asked is broken: what it did is unknown.
                Lease::Granted { amount: held, .. } if held < amount => {
                    Err(StoreError::unavailable("the store granted less than the least asked"))
                }
                lease => Ok(lease),
            });
        let (outcome, owed) = {
            let mut local = slot.local();
            let lease = match lease {
                Ok(lease) => lease,
                // The guard counts the operation as failed, once the slot's lock is let go.
                Err(error) => {
                    drop(local);
                    return Err(error);
                }
            };
            let owed = local.owed;
            let outcome = local.granted(lease, old, settle, take.id, amount, now);
            (outcome, owed)
        };
        in_flight.done();
        self.give_back(id, owed).await;
        Ok(outcome)
    }

    /// Gives `owed` (debits given back while a lease operation was in flight) back to the
    /// store, now that the settlement that counted them as used is done.
    ///
    /// Once: if the store fails, the client stays charged, as when the layer's own refund
    /// fails. A credit is not idempotent, and after an error (a lost reply, a timeout) it may
    /// have happened: trying again could give the money back twice, and serve unpaid work.
    async fn give_back(&self, id: ChannelId, owed: MilliSats) {
        if owed.is_zero() {
            return;
        }
        if let Err(error) = self.bounded(self.store.credit(id, owed)).await {
            tracing::warn!(%error, channel = %id, %owed, "a refund was not given back: the client stays charged");
        }
    }

    /// `call` on the store, given up after a quarter of the ttl (then its outcome is
    /// unknown, as after any store error): a hung store call never keeps a node from
    /// renewing or giving back its leases before they lapse.
    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.config.ttl / 4, call)
            .await
            .unwrap_or_else(|_| Err(StoreError::unavailable("the store did not answer in time")))
    }

    /// Settles this node's lease of channel `id` (and any of unknown outcome), if it holds
    /// one.
    async fn settle(self: &Arc<Self>, id: ChannelId) -> Result<(), StoreError> {
        let Some(slot) = self.slots.get(&id).map(|slot| Arc::clone(&slot)) else { return Ok(()) };
        let inner = Arc::clone(self);
        uncancelled(async move { inner.settle_slot(id, &slot).await }).await
    }

    async fn settle_slot(&self, id: ChannelId, slot: &Slot) -> Result<(), StoreError> {
        let _refill = slot.refill.lock().await;
        let (settle, retake) = {
            let mut local = slot.local();
            (local.begin(), local.retake)
        };
        let in_flight = InFlight { slot, settle, take: retake, done: false };
        // Two operations when both are pending: if the second fails, the first is settled
        // again by the next attempt (settling a settled lease changes nothing).
        for (lease, used) in settle.into_iter().chain(retake.map(|lease| (lease, MilliSats::ZERO)))
        {
            let settled = self.bounded(self.store.lease(id, LeaseRequest::settle(lease, used)));
            // On an error the guard counts the operation as failed.
            let _settled = settled.await?;
        }
        let owed = {
            let mut local = slot.local();
            let owed = local.owed;
            *local = Local {
                paid: local.paid,
                spent: local.spent.saturating_add(settle.map_or(MilliSats::ZERO, |(_, used)| used)),
                last: local.last,
                ..Local::default()
            };
            owed
        };
        in_flight.done();
        self.give_back(id, owed).await;
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

    /// Settles the leases unused for `idle`, older than a third of the ttl, or of unknown
    /// outcome, and forgets idle channels without a lease.
    async fn sweep(self: &Arc<Self>, now: Instant) {
        let (idle, old) = (self.config.idle, self.config.ttl / 3);
        let due: Vec<ChannelId> = self
            .slots
            .iter()
            .filter(|slot| {
                let local = slot.local();
                let unused = local.last.is_none_or(|last| now.duration_since(last) >= idle);
                let aged = local.taken.is_some_and(|taken| now.duration_since(taken) >= old);
                let unknown =
                    local.unsettled.is_some() || local.retake.is_some() || !local.owed.is_zero();
                !local.busy && (unknown || (local.lease.is_some() && (unused || aged)))
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
            let pending = local.lease.is_some()
                || local.unsettled.is_some()
                || local.retake.is_some()
                || !local.owed.is_zero();
            Arc::strong_count(slot) > 1 || pending || local.busy || !unused
        });
    }
}

/// Gives back idle leases and forfeits lapsed ones, until the store is dropped.
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
                    tracing::warn!(%forfeited, "lapsed leases (of nodes that died) forfeited");
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
        let inner = Arc::clone(&self.inner);
        async move {
            let record = inner.store.load(id).await?;
            if let Some(record) = &record {
                inner.saw_paid(id, record.paid());
                inner.saw_state(id, record.state);
            }
            Ok(record)
        }
    }

    fn store_payment(
        &self,
        id: ChannelId,
        payment: Transaction,
    ) -> impl Future<Output = Result<StorePayment, StoreError>> + Send {
        let paid = MilliSats::from_sat(crate::channel::server_amount(&payment));
        let inner = Arc::clone(&self.inner);
        async move {
            let stored = inner.store.store_payment(id, payment).await?;
            if let (StorePayment::Stored { .. }, Some(paid)) = (stored, paid) {
                inner.saw_paid(id, paid);
            }
            Ok(stored)
        }
    }

    /// Debits from this node's lease of the channel (see [`Leased`]).
    fn debit(
        &self,
        id: ChannelId,
        amount: MilliSats,
    ) -> impl Future<Output = Result<Debit, StoreError>> + Send {
        // Borrowed: no reference count to bump on the fast path.
        self.inner.debit(id, amount)
    }

    /// Stores the payment and debits in the store itself (a request with a new payment), and
    /// notes what the payment pays for the balances this node reports.
    fn pay(
        &self,
        id: ChannelId,
        payment: CheckedPayment,
        amount: MilliSats,
    ) -> impl Future<Output = Result<Debit, StoreError>> + Send {
        let paid = MilliSats::from_sat(payment.server_amount());
        let inner = Arc::clone(&self.inner);
        async move {
            let debit = inner.store.pay(id, payment, amount).await?;
            if let (Some(paid), false) = (paid, matches!(debit, Debit::NotOpen { .. })) {
                inner.saw_paid(id, paid);
            }
            Ok(debit)
        }
    }

    /// Settles this node's lease of the channel first, then waits (up to twice
    /// [`with_idle`](LeaseConfig::with_idle)) for other nodes to give theirs back while `payment`
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
            let wait = inner.config.idle.saturating_mul(2).min(Duration::from_secs(60));
            let deadline = Instant::now() + wait;
            let mut expired = false;
            loop {
                if inner.store.close_with(id, payment.clone()).await? {
                    // A lease taken since this node settled its own.
                    inner.saw_state(id, ChannelState::Closing);
                    return Ok(true);
                }
                let record = inner.store.load(id).await?.ok_or(StoreError::NotFound)?;
                let open = matches!(record.state, ChannelState::Open | ChannelState::Pending);
                let short = record.spent.saturating_add(record.forfeited) > offered;
                if !open || record.leased.is_zero() || short {
                    return Ok(false);
                }
                if Instant::now() >= deadline {
                    return Ok(false);
                }
                if !expired {
                    // Leases of nodes that died will not come back by themselves.
                    expired = true;
                    if let Err(error) = inner.store.expire_leases(now_ms()).await {
                        tracing::warn!(%error, "lapsed leases could not be expired");
                    }
                }
                let pause =
                    (inner.config.idle / 8).clamp(Duration::from_millis(5), Duration::from_secs(1));
                tokio::time::sleep(pause).await;
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
        claim: &IdempotencyClaim,
        response: Option<Vec<u8>>,
        expires_at: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.inner.store.finish_once(id, claim, response, expires_at)
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
                    return Ok(local.balance());
                }
                if local.busy || local.unsettled.is_some() {
                    // The lease the debit came from is being settled (or its settlement is
                    // unknown): after it, to the store (before it, the store may not count
                    // the debit yet).
                    local.owed = local.owed.saturating_add(amount);
                    return Ok(local.balance().saturating_add(local.owed));
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
            super::legal_move(from, to)?;
            if from == ChannelState::Open && to != ChannelState::Open {
                inner.settle(id).await?;
            }
            let moved = inner.store.transition(id, from, to).await?;
            if moved {
                // A lease taken between the settlement and the move.
                inner.saw_state(id, to);
            }
            Ok(moved)
        }
    }

    fn next_key_index(&self) -> impl Future<Output = Result<u32, StoreError>> + Send {
        self.inner.store.next_key_index()
    }

    /// Lists the channels in `state`; this node stops drawing on its leases of channels that
    /// are not open: those listed in another state, and those a listing of the open channels
    /// leaves out (see [`Leased`]). The settlement task lists every state on every pass.
    fn list(
        &self,
        state: ChannelState,
    ) -> impl Future<Output = Result<Vec<ChannelRecord>, StoreError>> + Send {
        let inner = Arc::clone(&self.inner);
        async move {
            let began = Instant::now();
            let records = inner.store.list(state).await?;
            if state == ChannelState::Open {
                inner.saw_open(began, &records).await;
            } else {
                for record in &records {
                    inner.saw_state(record.id(), record.state);
                }
            }
            Ok(records)
        }
    }

    fn count(&self, state: ChannelState) -> impl Future<Output = Result<usize, StoreError>> + Send {
        self.inner.store.count(state)
    }
}
