//! Getting paid on chain: the funding watch and the background settlement task.
//!
//! Until the server closes a channel on chain, it has been paid nothing. [`Settlement`] is a
//! tokio task driven **by the store** — every pass lists the channels by state, so it picks
//! up where it left off after a restart — that, for each channel:
//!
//! * **pending / open** — watches the funding output in the UTXO set and the mempool, which
//!   every node can answer (no transaction index): a pending channel opens at
//!   `min_confirmations`; an open channel whose unconfirmed funding left the mempool is
//!   suspended (pending) until it is back; a funding that did not confirm within
//!   `confirm_within_blocks` fails the channel; at the close margin (expiry − margin) a channel
//!   whose funding output is unspent moves to **closing**. The decisions are the pure
//!   [`FundingPolicy::funding_action`];
//!   Without a package path (a backend without package relay, or no CPFP key), an open
//!   channel is also closed early, before its margin, once the mempool's minimum fee rate
//!   reaches [`with_early_close`](Settlement::with_early_close)'s share of the channel's
//!   payment fee rate: a close below the minimum could not get in;
//! * **closing** (margin reached, or a cooperative close was asked for) — co-signs the best
//!   payment, read after the move to closing, and broadcasts it; one below the mempool's
//!   minimum fee goes out as a package with a CPFP child (one that cannot is counted in
//!   [`SettlementMetrics::closes_below_mempool_minimum`] and logged as an error); a failed
//!   broadcast is retried with exponential backoff; once broadcast the channel is **closed**;
//! * **closed** — waits for the settlement to confirm and only then marks it **settled**; a
//!   settlement that vanished (the backend knows it neither in its mempool nor in a block) is
//!   broadcast again ([`SettlementMetrics::rebroadcasts`]); one that has not confirmed `cpfp_after`
//!   blocks after it was first seen waiting — or that is about to run into the expiry — is
//!   bumped by a child spending the server's output at the backend's fee estimate (CPFP);
//! * **failed** — a channel whose funding output shows up confirmed after all (until
//!   [`RESCUE_WINDOW_BLOCKS`] after its expiry) is closed with its best payment.
//!
//! [`SettlementMetrics`] reports channels by state, sats settled, closes pending, broadcast
//! failures and bumps; every pass and every channel runs in a `tracing` span.
//!
//! # Examples
//!
//! ```
//! use bitcoin::Network;
//! use bitcoin::bip32::Xpriv;
//! use paychan::chain::sim::SimulatedChain;
//! use paychan::channel::FundingPolicy;
//! use paychan::settlement::Settlement;
//! use paychan::store::MemoryStore;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let store = MemoryStore::new(); // the same store the PaywallLayer uses
//! let master = Xpriv::new_master(Network::Regtest, &[1; 32]).unwrap(); // the Negotiation's key
//! let mut settlement = Settlement::new(store, SimulatedChain::new(), master)
//!     .with_funding_policy(FundingPolicy::default().with_min_confirmations(1));
//! let report = settlement.run_once().await.unwrap();
//! assert_eq!(report.broadcast, 0);
//! // In a server: `tokio::spawn(settlement.run(std::time::Duration::from_secs(30)));`
//! # }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bitcoin::absolute::LockTime;
use bitcoin::bip32::Xpriv;
use bitcoin::secp256k1::SecretKey;
use bitcoin::{FeeRate, ScriptBuf, Txid};
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::chain::ChainBackend;
use crate::channel::ChainTip;
use crate::channel::ChannelState;
use crate::store::{ChannelRecord, ChannelStore};
use crate::wire::ChannelId;

use crate::channel::bump_is_due;
use crate::channel::{FundingAction, FundingPolicy};
pub use report::{PassReport, SettlementError, SettlementMetrics};

mod close;
mod cpfp;
mod report;

pub use close::{CloseOutcome, close_now};
use close::{Closer, Cpfp, Location};

/// A close (or CPFP) waiting to be retried.
#[derive(Debug, Clone, Copy)]
struct Retry {
    failures: u32,
    next: Instant,
}

/// The background settlement task. See the [module documentation](self).
#[derive(Debug)]
pub struct Settlement<St, C> {
    store: St,
    chain: C,
    master: Xpriv,
    funding: FundingPolicy,
    cpfp_key: Option<(SecretKey, ScriptBuf)>,
    cpfp_after: u32,
    cpfp_min_fee_rate: FeeRate,
    early_close_percent: u64,
    /// The mempool pressure the last pass saw (see `mempool_pressure`).
    pressure_before: Option<FeeRate>,
    backoff: (Duration, Duration),
    retries: HashMap<ChannelId, Retry>,
    /// The height at which each close was first seen waiting in the mempool.
    waiting_since: HashMap<ChannelId, u32>,
    /// CPFP children broadcast, by channel.
    bumps: HashMap<ChannelId, Txid>,
    metrics: Arc<Mutex<SettlementMetrics>>,
    /// Settled channels, counted every [`SETTLED_RECOUNT`] passes and followed in between
    /// (other nodes' tasks settle too): a pass never reads what it does not act on.
    settled: Option<usize>,
    passes: u64,
}

/// How often (in passes) the settled channels are counted again in the store.
const SETTLED_RECOUNT: u64 = 100;

/// How long after its expiry a failed channel is still closed if its funding confirms.
pub const RESCUE_WINDOW_BLOCKS: u32 = 144;

impl<St: ChannelStore, C: ChainBackend> Settlement<St, C> {
    /// Settles the channels of `store` through `chain`, with server keys derived from
    /// `master` (the [`Negotiation`](crate::server::Negotiation)'s key). Defaults: the
    /// default [`FundingPolicy`], no CPFP key, CPFP after 3 blocks, retries after 1 s
    /// doubling up to 5 minutes.
    pub fn new(store: St, chain: C, master: Xpriv) -> Self {
        Self {
            store,
            chain,
            master,
            funding: FundingPolicy::default(),
            cpfp_key: None,
            cpfp_after: 3,
            cpfp_min_fee_rate: FeeRate::from_sat_per_vb_u32(10),
            early_close_percent: 80,
            pressure_before: None,
            backoff: (Duration::from_secs(1), Duration::from_secs(300)),
            retries: HashMap::new(),
            waiting_since: HashMap::new(),
            bumps: HashMap::new(),
            metrics: Arc::default(),
            settled: None,
            passes: 0,
        }
    }

    /// The funding policy (give the same to the `Negotiation`).
    #[must_use]
    pub fn with_funding_policy(mut self, policy: FundingPolicy) -> Self {
        self.funding = policy;
        self
    }

    /// The key of the server's payout script (P2WPKH), which lets the task bump a stuck
    /// settlement by CPFP from the server's output. Without it, settlements are only
    /// rebroadcast.
    #[must_use]
    pub fn with_cpfp_key(mut self, key: SecretKey) -> Self {
        let public = crate::channel::sig::public_key(&key);
        self.cpfp_key = Some((key, ScriptBuf::new_p2wpkh(&public.wpubkey_hash())));
        self
    }

    /// Bump a settlement that is still unconfirmed `blocks` after it was first seen waiting.
    #[must_use]
    pub fn with_cpfp_after(mut self, blocks: u32) -> Self {
        self.cpfp_after = blocks;
        self
    }

    /// The lowest fee rate a CPFP package (settlement and child) pays; the backend's estimate
    /// is used when it is higher (default 10 sat/vB).
    #[must_use]
    pub fn with_cpfp_min_fee_rate(mut self, rate: FeeRate) -> Self {
        self.cpfp_min_fee_rate = rate;
        self
    }

    /// Without a package path — the backend has no package relay
    /// ([`ChainBackend::has_package_relay`]), or the task no CPFP key — close an open channel
    /// before its margin once the mempool minimum ([`ChainBackend::mempool_min_fee_rate`]),
    /// raised above the relay floor, reaches `percent` % of the channel's payment fee rate,
    /// while its close still gets in (default 80; 0 never closes early). With a package path
    /// a close below the minimum goes out with a CPFP child instead.
    #[must_use]
    pub fn with_early_close(mut self, percent: u32) -> Self {
        self.early_close_percent = u64::from(percent);
        self
    }

    /// Retry a failed broadcast after `initial`, doubling up to `max`.
    #[must_use]
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff = (initial, max);
        self
    }

    /// A handle on the metrics, updated by every pass.
    pub fn metrics(&self) -> Arc<Mutex<SettlementMetrics>> {
        Arc::clone(&self.metrics)
    }

    /// Runs passes forever, one every `every`.
    pub async fn run(mut self, every: Duration) {
        if self.cpfp_key.is_none() {
            tracing::warn!(
                "settlement without a CPFP key: a close that waits in the mempool cannot be \
                 bumped, and one below the mempool minimum cannot go out in a package"
            );
        }
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            if let Err(error) = self.run_once().await {
                tracing::warn!(%error, "settlement pass failed; retrying at the next one");
            }
        }
    }

    /// One pass over every channel that is not settled or failed.
    ///
    /// # Errors
    ///
    /// If the tip or the channel lists cannot be read; nothing was changed then.
    pub async fn run_once(&mut self) -> Result<PassReport, SettlementError> {
        let span = tracing::info_span!("settlement_pass");
        async {
            let tip = match self.chain.tip().await {
                Ok(tip) => tip,
                Err(error) => {
                    // Without the chain the pass acts on nothing, but it still reads the open
                    // channels: a store with leases (`store::Leased`) stops drawing on the
                    // leases of channels that left open, whatever the chain does.
                    let _ = self.list(ChannelState::Open).await;
                    return Err(SettlementError::Chain(error));
                }
            };
            let mut report = PassReport::default();
            // Only the states the pass acts on are read; settled channels are only counted.
            let mut pressure = None;
            for state in [ChannelState::Pending, ChannelState::Open] {
                let records = self.list(state).await?;
                if state == ChannelState::Open && !records.is_empty() {
                    // One reading is not enough to close every channel early: the pressure
                    // must hold over two passes in a row (the lower reading counts).
                    let now = self.mempool_pressure().await;
                    pressure = now.zip(self.pressure_before).map(|(a, b)| a.min(b));
                    self.pressure_before = now;
                }
                for record in records {
                    let span = tracing::info_span!("funding", channel = %record.id());
                    self.watch_funding(&record, tip, pressure, &mut report).instrument(span).await;
                }
            }
            for record in self.list(ChannelState::Closing).await? {
                let span = tracing::info_span!("close", channel = %record.id());
                self.close(&record, &mut report).instrument(span).await;
            }
            for record in self.list(ChannelState::Closed).await? {
                let span = tracing::info_span!("confirm", channel = %record.id());
                self.confirm(&record, tip, &mut report).instrument(span).await;
            }
            for record in self.list(ChannelState::Failed).await? {
                let span = tracing::info_span!("rescue", channel = %record.id());
                self.rescue(&record, tip, &mut report).instrument(span).await;
            }
            self.count_states(&report).await?;
            Ok(report)
        }
        .instrument(span)
        .await
    }

    async fn list(&self, state: ChannelState) -> Result<Vec<ChannelRecord>, SettlementError> {
        self.store.list(state).await.map_err(SettlementError::Store)
    }

    /// Counts the channels in every state (after the pass moved some on), without reading
    /// them; the settled ones only every [`SETTLED_RECOUNT`] passes.
    async fn count_states(&mut self, report: &PassReport) -> Result<(), SettlementError> {
        let mut channels = BTreeMap::new();
        for state in ChannelState::ALL {
            let count = match (state, self.settled) {
                (ChannelState::Settled, Some(settled))
                    if !self.passes.is_multiple_of(SETTLED_RECOUNT) =>
                {
                    settled + report.settled
                }
                _ => self.store.count(state).await.map_err(SettlementError::Store)?,
            };
            if state == ChannelState::Settled {
                self.settled = Some(count);
            }
            channels.insert(state.as_str(), count);
        }
        self.passes += 1;
        let mut metrics = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
        metrics.closes_pending = channels["closing"] + channels["closed"];
        metrics.channels = channels;
        Ok(())
    }

    fn metric(&self, update: impl FnOnce(&mut SettlementMetrics)) {
        update(&mut self.metrics.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Moves `record` from `from` to `to`; `false` if another node did it first.
    async fn transition(
        &self,
        record: &ChannelRecord,
        from: ChannelState,
        to: ChannelState,
    ) -> bool {
        match self.store.transition(record.id(), from, to).await {
            Ok(moved) => {
                if moved {
                    tracing::info!(from = from.as_str(), to = to.as_str(), "channel state");
                }
                moved
            }
            Err(error) => {
                tracing::warn!(%error, "store: state change deferred to the next pass");
                false
            }
        }
    }

    /// The mempool minimum, when closes could not get in below it: early closing is on, there
    /// is no package path, and the minimum is above the relay floor (the mempool is full).
    /// `None` otherwise, or if the backend does not answer.
    async fn mempool_pressure(&self) -> Option<FeeRate> {
        if self.early_close_percent == 0 {
            return None;
        }
        if self.cpfp_key.is_some() {
            match self.chain.has_package_relay().await {
                Ok(true) => return None,
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(%error, "package relay unknown this pass");
                    return None;
                }
            }
        }
        match (self.chain.mempool_min_fee_rate().await, self.chain.min_relay_fee_rate().await) {
            // Only a minimum raised above the relay floor is pressure: a channel agreed at the
            // floor is not closed early by a mempool that is not full.
            (Ok(minimum), Ok(floor)) => (minimum > floor).then_some(minimum),
            (Err(error), _) | (_, Err(error)) if error.is_unsupported() => {
                tracing::debug!(%error, "no mempool minimum: no early closes");
                None
            }
            (Err(error), _) | (_, Err(error)) => {
                tracing::warn!(%error, "mempool minimum unknown this pass");
                None
            }
        }
    }

    /// Whether `record` is closed now, before its margin: `pressure` (the mempool minimum with
    /// no package path) reached the early-close share of its payment fee rate.
    fn closes_early(&self, record: &ChannelRecord, pressure: Option<FeeRate>) -> bool {
        let Some(minimum) = pressure else { return false };
        let rate = record.channel.params().min_fee_rate.to_sat_per_kwu();
        record.best.is_some()
            && minimum.to_sat_per_kwu().saturating_mul(100)
                >= rate.saturating_mul(self.early_close_percent)
    }

    async fn watch_funding(
        &mut self,
        record: &ChannelRecord,
        tip: ChainTip,
        pressure: Option<FeeRate>,
        report: &mut PassReport,
    ) {
        let funding = match self.chain.unspent(&record.channel.outpoint()).await {
            Ok(utxo) => utxo.map(|utxo| utxo.confirmations),
            Err(error) => {
                tracing::warn!(%error, "funding status unknown this pass");
                return;
            }
        };
        let state = record.state;
        match record.funding_action(&self.funding, funding, tip) {
            FundingAction::Keep
                if state == ChannelState::Open && self.closes_early(record, pressure) =>
            {
                if self.transition(record, state, ChannelState::Closing).await {
                    tracing::error!(
                        mempool_min_fee_rate = ?pressure,
                        channel_fee_rate = ?record.channel.params().min_fee_rate,
                        "the mempool minimum nears the channel's fee rate and no package can \
                         carry its close: closing it early"
                    );
                    report.closing += 1;
                    self.metric(|m| m.early_closes += 1);
                    self.close_reloaded(record.id(), report).await;
                }
            }
            FundingAction::Keep => {}
            FundingAction::Open => {
                if self.transition(record, state, ChannelState::Open).await {
                    report.opened += 1;
                }
            }
            FundingAction::Suspend => {
                if self.transition(record, state, ChannelState::Pending).await {
                    tracing::warn!("the unconfirmed funding vanished: channel suspended");
                    report.suspended += 1;
                }
            }
            FundingAction::Fail => {
                if self.transition(record, state, ChannelState::Failed).await {
                    tracing::warn!(?funding, "funding not confirmed in time: channel failed");
                    report.failed += 1;
                    self.metric(|m| m.failed_fundings += 1);
                }
            }
            FundingAction::Close => {
                if self.transition(record, state, ChannelState::Closing).await {
                    report.closing += 1;
                    self.close_reloaded(record.id(), report).await;
                }
            }
        }
    }

    /// A failed channel whose funding output turned up confirmed after all (it confirmed after
    /// its deadline, or a backend answered wrongly once): it is alive. Before the close margin
    /// it serves again; at the margin it is closed with its best payment.
    async fn rescue(&mut self, record: &ChannelRecord, tip: ChainTip, report: &mut PassReport) {
        if record.best.is_none() || !self.may_rescue(record, tip) {
            return;
        }
        let confirmed = matches!(
            self.chain.unspent(&record.channel.outpoint()).await,
            Ok(Some(utxo)) if utxo.confirmations > 0
        );
        if !confirmed {
            return;
        }
        if !record.channel.params().is_closing(tip) {
            if self.transition(record, ChannelState::Failed, ChannelState::Open).await {
                tracing::info!("the funding of a failed channel is confirmed: open again");
                report.opened += 1;
            }
        } else if self.transition(record, ChannelState::Failed, ChannelState::Closing).await {
            tracing::info!("the funding of a failed channel confirmed: closing it");
            report.closing += 1;
            self.close_reloaded(record.id(), report).await;
        }
    }

    /// Failed channels are looked at until [`RESCUE_WINDOW_BLOCKS`] after their expiry (in
    /// the expiry's unit: blocks, or 10 minutes a block).
    fn may_rescue(&self, record: &ChannelRecord, tip: ChainTip) -> bool {
        match record.channel.params().expiry {
            LockTime::Blocks(h) => {
                tip.height <= h.to_consensus_u32().saturating_add(RESCUE_WINDOW_BLOCKS)
            }
            LockTime::Seconds(t) => {
                tip.median_time_past
                    <= t.to_consensus_u32().saturating_add(RESCUE_WINDOW_BLOCKS * 600)
            }
        }
    }

    /// Closes the channel from its record as stored now: from `Closing` on the best payment is
    /// frozen, so this is the close every node and the close endpoint build (a payment stored
    /// between a listing and the transition is included).
    async fn close_reloaded(&mut self, id: ChannelId, report: &mut PassReport) {
        match self.store.load(id).await {
            Ok(Some(record)) if record.state == ChannelState::Closing => {
                self.close(&record, report).await;
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "store: close deferred to the next pass"),
        }
    }

    /// The closing procedure with this task's chain, key, CPFP key and metrics.
    fn closer(&self) -> Closer<'_, St, C> {
        let cpfp = self.cpfp_key.as_ref().map(|(key, script)| Cpfp {
            key,
            script,
            min_fee_rate: self.cpfp_min_fee_rate,
        });
        Closer {
            store: &self.store,
            chain: &self.chain,
            master: &self.master,
            cpfp,
            metrics: Some(&self.metrics),
        }
    }

    fn due(&self, id: ChannelId) -> bool {
        self.retries.get(&id).is_none_or(|retry| Instant::now() >= retry.next)
    }

    fn failed(&mut self, id: ChannelId, report: &mut PassReport) {
        let (initial, max) = self.backoff;
        let retry = self.retries.entry(id).or_insert(Retry { failures: 0, next: Instant::now() });
        retry.failures += 1;
        let delay = initial.saturating_mul(1 << retry.failures.min(16).saturating_sub(1)).min(max);
        retry.next = Instant::now() + delay;
        report.retrying += 1;
        self.metric(|m| m.broadcast_failures += 1);
    }

    /// Runs the closing procedure on a closing channel, when its backoff allows.
    async fn close(&mut self, record: &ChannelRecord, report: &mut PassReport) {
        let id = record.id();
        if !self.due(id) {
            return;
        }
        let known_child = self.bumps.get(&id).copied();
        match self.closer().close(record, known_child).await {
            Ok(CloseOutcome::Closed { child, .. }) => {
                self.retries.remove(&id);
                report.broadcast += 1;
                if let Some(child) = child.filter(|child| known_child != Some(*child)) {
                    self.bumps.insert(id, child);
                    report.bumped += 1;
                }
            }
            Ok(CloseOutcome::Queued { error, .. }) => {
                tracing::warn!(%error, "settlement broadcast failed; retrying with backoff");
                self.failed(id, report);
            }
            Ok(CloseOutcome::Failed) => report.failed += 1,
            Ok(CloseOutcome::NotClosable(_)) => {}
            Err(error) => tracing::warn!(%error, "store: state change deferred to the next pass"),
        }
    }

    async fn confirm(&mut self, record: &ChannelRecord, tip: ChainTip, report: &mut PassReport) {
        let id = record.id();
        let closer = self.closer();
        let Some(close) = closer.build(record) else { return };
        let Some(location) = closer.locate(&close, self.bumps.get(&id).copied()).await else {
            tracing::warn!("settlement status unknown this pass");
            return;
        };
        match location {
            Location::Confirmed => {
                if self.transition(record, ChannelState::Closed, ChannelState::Settled).await {
                    report.settled += 1;
                    self.metric(|m| m.sats_settled += record.paid_amount());
                }
                self.waiting_since.remove(&id);
                self.bumps.remove(&id);
                self.retries.remove(&id);
            }
            Location::Missing => {
                if self.closer().funding_exists(record).await {
                    // Evicted (or never relayed): broadcast it again.
                    if !self.due(id) {
                        return;
                    }
                    match self.closer().submit(record, &close).await {
                        Ok(child) => {
                            if let Some(child) = child {
                                self.bumps.insert(id, child);
                                report.bumped += 1;
                            }
                            tracing::warn!("the settlement had left the mempool: broadcast again");
                            self.retries.remove(&id);
                            self.metric(|m| m.rebroadcasts += 1);
                        }
                        Err(error) => {
                            tracing::error!(%error, "the settlement left the mempool and its \
                                rebroadcast failed; retrying with backoff");
                            self.failed(id, report);
                        }
                    }
                } else if record.channel.params().refund_is_valid(tip) {
                    // The funding is spent, not by this close (none of its outputs is in a
                    // block), and the refund is valid: the refund won.
                    tracing::error!("the funding was spent by another transaction");
                    if self.transition(record, ChannelState::Closed, ChannelState::Failed).await {
                        report.failed += 1;
                    }
                }
                // Otherwise only a close can have spent the funding (the refund is not valid
                // yet): wait for the next pass to find it.
            }
            Location::InMempool => {
                let since = *self.waiting_since.entry(id).or_insert(tip.height);
                if bump_is_due(&record.channel, since, tip, self.cpfp_after)
                    && !self.bumps.contains_key(&id)
                    && self.due(id)
                {
                    self.bump(record, &close, report).await;
                }
            }
        }
    }
}
