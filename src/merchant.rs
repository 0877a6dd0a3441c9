//! [`Merchant`]: the server side wired in one place.

use core::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bitcoin::bip32::Xpriv;
use bitcoin::secp256k1::SecretKey;
use bitcoin::{Network, ScriptBuf};
use tokio::task::JoinHandle;

use crate::chain::{ChainBackend, ChainError, check_network, follow_tip};
use crate::channel::{FundingPolicy, Terms};
use crate::server::{DescribePrices, Negotiation, PaywallLayer};
use crate::settlement::{Settlement, SettlementMetrics};
use crate::store::{ChannelStore, MemoryStore};

/// Everything a paid API runs, wired on one store, one chain backend and one master key: the
/// metering layer with the negotiation endpoints, the chain tip it follows, and the
/// settlement task that collects before every channel expires.
///
/// Building the three by hand ([`PaywallLayer`], [`Negotiation`], [`Settlement`]) gives the
/// same result; this is the short way, and it cannot forget the settlement task nor the
/// network check ([`check_network`]: a server configured for
/// one network never starts on another's chain).
///
/// # Examples
///
/// ```
/// use axum::{Router, routing::get};
/// use paychan::{Merchant, MilliSats, bitcoin::{Network, ScriptBuf, bip32::Xpriv}, server::Paid};
/// # use paychan::chain::sim::SimulatedChain;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let master = Xpriv::new_master(Network::Regtest, &[1; 32])?; // secret: it signs every close
/// let payout = ScriptBuf::from_hex("0014751e76e8199196d454941c45d1b3a323f1433bd6")?;
/// let paid = Merchant::new(Network::Regtest, master, payout, SimulatedChain::new())
///     .start(MilliSats::from_msat(2_000)) // every request costs 2 sat
///     .await?;
/// let app: Router = Router::new()
///     .route("/joke", get(|paid: Paid| async move { format!("{} msat left", paid.balance) }))
///     .layer(paid.layer());
/// # Ok(())
/// # }
/// ```
#[must_use]
pub struct Merchant<St, C> {
    config: Config<C>,
    store: St,
}

/// A merchant's configuration, apart from its store.
struct Config<C> {
    network: Network,
    master: Xpriv,
    payout_script: ScriptBuf,
    chain: C,
    terms: Terms,
    funding: FundingPolicy,
    cpfp_key: Option<SecretKey>,
    prices: DescribePrices,
    tip_every: Duration,
    settle_every: Duration,
    client_ip_header: Option<http::HeaderName>,
    settles: bool,
}

impl<St, C> fmt::Debug for Merchant<St, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Merchant")
            .field("network", &self.config.network)
            .field("payout_script", &self.config.payout_script)
            .field("terms", &self.config.terms)
            .field("funding", &self.config.funding)
            .field("cpfp", &self.config.cpfp_key.is_some())
            .finish_non_exhaustive()
    }
}

impl<C: ChainBackend + Clone + 'static> Merchant<MemoryStore, C> {
    /// A merchant on `network` that derives a fresh key per channel from `master`, is paid to
    /// `payout_script`, and reads and writes the chain through `chain`. Defaults: channels in
    /// memory ([`with_store`](Self::with_store) for a durable one), [`Terms::default`], the
    /// default [`FundingPolicy`], the tip read every 10 s, a settlement pass every 30 s.
    pub fn new(network: Network, master: Xpriv, payout_script: ScriptBuf, chain: C) -> Self {
        let config = Config {
            network,
            master,
            payout_script,
            chain,
            terms: Terms::default(),
            funding: FundingPolicy::default(),
            cpfp_key: None,
            prices: DescribePrices::fixed(serde_json::Value::Null),
            tip_every: Duration::from_secs(10),
            settle_every: Duration::from_secs(30),
            client_ip_header: None,
            settles: true,
        };
        Self { config, store: MemoryStore::new() }
    }
}

impl<St, C> Merchant<St, C>
where
    St: ChannelStore + Clone,
    C: ChainBackend + Clone + 'static,
{
    /// Keeps the channels in `store` (a clone goes to the settlement task: stores are handles
    /// on shared state).
    pub fn with_store<S2: ChannelStore + Clone>(self, store: S2) -> Merchant<S2, C> {
        Merchant { config: self.config, store }
    }

    /// The channels the server agrees to (values, lifetimes, fee rates).
    pub fn with_terms(mut self, terms: Terms) -> Self {
        self.config.terms = terms;
        self
    }

    /// When a funded channel is served, given to the negotiation and the settlement task.
    pub fn with_funding_policy(mut self, policy: FundingPolicy) -> Self {
        self.config.funding = policy;
        self
    }

    /// The key of the payout script (P2WPKH): lets the settlement task bump a close that
    /// waits in the mempool (see [`Settlement::with_cpfp_key`]).
    pub fn with_cpfp_key(mut self, key: SecretKey) -> Self {
        self.config.cpfp_key = Some(key);
        self
    }

    /// Publishes `prices` in the terms document (for example
    /// [`RoutePrices::describe`](crate::server::RoutePrices::describe)).
    pub fn with_prices(mut self, prices: serde_json::Value) -> Self {
        self.config.prices = DescribePrices::fixed(prices);
        self
    }

    /// Publishes what `describe` answers, asked on every terms request (see
    /// [`Negotiation::with_prices_from`]): for prices reloaded while the merchant runs, with a
    /// pricing that reads the same table.
    pub fn with_prices_from(
        mut self,
        describe: impl Fn() -> serde_json::Value + Send + Sync + 'static,
    ) -> Self {
        self.config.prices = DescribePrices::from_fn(describe);
        self
    }

    /// Behind a reverse proxy you trust, the negotiation's per-client limits take the client's
    /// address from the last address in `header` (see
    /// [`Negotiation::with_client_ip_header`]); without it every client is the proxy and all
    /// share one client's limits.
    pub fn with_client_ip_header(mut self, header: http::HeaderName) -> Self {
        self.config.client_ip_header = Some(header);
        self
    }

    /// Whether this merchant runs the settlement task (default: it does). Several nodes on
    /// one shared store may run it on some of them only (the store's atomic moves let several
    /// work side by side, but one is enough); a store that no node settles is collected only
    /// when clients close, and a channel whose client never does is lost at its expiry.
    pub fn with_settlement(mut self, runs: bool) -> Self {
        self.config.settles = runs;
        self
    }

    /// How often the chain tip is read, and how often the settlement task runs a pass.
    pub fn with_intervals(mut self, tip: Duration, settlement: Duration) -> Self {
        self.config.tip_every = tip;
        self.config.settle_every = settlement;
        self
    }

    /// Checks that the chain backend is on the merchant's network
    /// ([`check_network`]), reads the chain tip, starts following
    /// it, spawns the settlement task, and returns the layer that charges by `pricing` and
    /// serves the negotiation endpoints. Call it inside a tokio runtime.
    ///
    /// # Errors
    ///
    /// [`ChainError::WrongNetwork`] if the chain backend is on another network than the one
    /// given to [`new`](Merchant::new) (a mainnet merchant on a regtest node would serve
    /// clients who pay in regtest coins); any other error if the backend cannot tell its
    /// network or its tip. Nothing is started then.
    pub async fn start<P: Clone>(self, pricing: P) -> Result<Started<St, P>, ChainError> {
        let Self { config, store } = self;
        check_network(&config.chain, config.network).await?;
        let tip = follow_tip(config.chain.clone(), config.tip_every).await?;
        let negotiation = Negotiation::new(
            config.network,
            config.terms,
            config.master,
            config.payout_script,
            config.chain.clone(),
        )
        .with_funding_policy(config.funding)
        .with_described_prices(config.prices);
        let negotiation = match config.client_ip_header {
            Some(header) => negotiation.with_client_ip_header(header),
            None => negotiation,
        };
        let layer = PaywallLayer::new(store.clone(), pricing, tip).with_negotiation(negotiation);
        let mut settlement =
            Settlement::new(store, config.chain, config.master).with_funding_policy(config.funding);
        if let Some(key) = config.cpfp_key {
            settlement = settlement.with_cpfp_key(key);
        }
        let metrics = settlement.metrics();
        let task = config.settles.then(|| tokio::spawn(settlement.run(config.settle_every)));
        Ok(Started { layer, metrics, task })
    }
}

/// A started [`Merchant`]: its layer, and the settlement task running in the background.
/// Dropping it leaves the task running; [`stop`](Self::stop) ends it.
#[must_use]
pub struct Started<St, P> {
    layer: PaywallLayer<St, P>,
    metrics: Arc<Mutex<SettlementMetrics>>,
    task: Option<JoinHandle<()>>,
}

impl<St, P> fmt::Debug for Started<St, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Started").field("layer", &self.layer).finish_non_exhaustive()
    }
}

impl<St, P> Started<St, P> {
    /// The layer to put in front of the API (cheap to clone: every clone meters on the same
    /// store and cache).
    pub fn layer(&self) -> PaywallLayer<St, P> {
        self.layer.clone()
    }

    /// The settlement task's counters, as of its last pass.
    pub fn metrics(&self) -> SettlementMetrics {
        self.metrics.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// Stops the settlement task (the layer keeps working; channels are closed by the next
    /// merchant that runs on the same store).
    pub fn stop(self) {
        if let Some(task) = self.task {
            task.abort();
        }
    }
}
