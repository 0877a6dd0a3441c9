//! The negotiation endpoints: terms, open, refund, fund, status and cooperative close.
// Handlers fail with the problem document they answer with (152 bytes), on cold paths only.
#![allow(clippy::result_large_err)]

mod close;
mod open;

use core::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bitcoin::bip32::Xpriv;
use bitcoin::consensus::encode::deserialize_hex;
use bitcoin::secp256k1::SecretKey;
use bitcoin::{Network, ScriptBuf, Transaction};
use dashmap::DashMap;
use serde_json::Value;
use tokio::sync::watch;

use crate::chain::{ChainBackend, ChainError};
use crate::channel::{ChainTip, ChannelParams, FundingPolicy, Terms};
use crate::store::ChannelStore;
use crate::wire::{Problem, ProblemCode};

/// Where the negotiation endpoints live by default.
pub const DEFAULT_PREFIX: &str = "/payment-channel";

/// The negotiation side of the server: its terms, its keys and where it broadcasts.
///
/// Plug it into the layer with [`PaywallLayer::with_negotiation`](super::PaywallLayer::with_negotiation);
/// the layer then answers `GET /.well-known/payment-channel` (the terms) and, under
/// [`DEFAULT_PREFIX`], `POST /open`, `POST /refund`, `POST /fund`, `GET /channels/{id}` and
/// `POST /channels/{id}/close`. See `docs/HTTP.md`.
///
/// Each channel's server key is derived from `master` at the hardened index
/// `m/<index>'`, where the index comes from [`ChannelStore::next_key_index`]: the store holds
/// indexes, never keys.
#[derive(Debug, Clone)]
#[must_use]
pub struct Negotiation<C> {
    terms: Terms,
    master: Xpriv,
    network: Network,
    payout_script: ScriptBuf,
    chain: C,
    prefix: String,
    open_limit: u32,
    open_window: Duration,
    max_pending: usize,
    max_pending_per_client: usize,
    max_pending_per_network: usize,
    proposal_ttl: Duration,
    client_ip_header: Option<http::HeaderName>,
    prices: DescribePrices,
    funding: FundingPolicy,
}

/// What the terms document publishes as `prices`, asked on every terms request.
#[derive(Clone)]
pub(crate) struct DescribePrices(Arc<dyn Fn() -> Value + Send + Sync>);

impl DescribePrices {
    /// `prices`, always.
    pub(crate) fn fixed(prices: Value) -> Self {
        Self(Arc::new(move || prices.clone()))
    }

    /// What `describe` answers when asked.
    pub(crate) fn from_fn(describe: impl Fn() -> Value + Send + Sync + 'static) -> Self {
        Self(Arc::new(describe))
    }

    /// The description now.
    pub(crate) fn get(&self) -> Value {
        (self.0)()
    }
}

impl fmt::Debug for DescribePrices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DescribePrices(<fn>)")
    }
}

/// The most inputs a funding transaction may have (each is looked up on the chain backend).
pub(crate) const MAX_FUNDING_INPUTS: usize = 64;

/// The largest negotiation request body: 256 KiB, whatever limit the host application sets.
const MAX_BODY: usize = 256 * 1024;

impl<C: ChainBackend + Clone + 'static> Negotiation<C> {
    /// Negotiates channels on `network` under `terms`, deriving keys from `master`, paying
    /// the server to `payout_script`, broadcasting through `chain`.
    ///
    /// It does not ask `chain` which network it is on: before serving, call
    /// [`check_network`](crate::chain::check_network) (as [`Merchant::start`](crate::Merchant::start)
    /// does), or a server for `network` on another network's backend takes that network's
    /// coins as payment.
    pub fn new(
        network: Network,
        terms: Terms,
        master: Xpriv,
        payout_script: ScriptBuf,
        chain: C,
    ) -> Self {
        Self {
            terms,
            master,
            network,
            payout_script,
            chain,
            prefix: DEFAULT_PREFIX.to_owned(),
            open_limit: 10,
            open_window: Duration::from_secs(60),
            max_pending: 10_000,
            max_pending_per_client: 20,
            max_pending_per_network: 100,
            proposal_ttl: Duration::from_secs(600),
            client_ip_header: None,
            prices: DescribePrices::fixed(Value::Null),
            funding: FundingPolicy::default(),
        }
    }

    /// When a funded channel starts serving requests (give the same policy to the
    /// [`Settlement`](crate::settlement::Settlement) task, which watches the funding). With
    /// `min_confirmations` above 0 a new channel is pending until then.
    pub fn with_funding_policy(mut self, policy: FundingPolicy) -> Self {
        self.funding = policy;
        self
    }

    /// Publishes `prices` in the terms document (for example [`RoutePrices::describe`]).
    ///
    /// [`RoutePrices::describe`]: super::RoutePrices::describe
    pub fn with_prices(mut self, prices: Value) -> Self {
        self.prices = DescribePrices::fixed(prices);
        self
    }

    /// Publishes what `describe` answers, asked on every terms request: for a price table
    /// that changes while the server runs (a reload), so the terms never lag behind it.
    pub fn with_prices_from(
        mut self,
        describe: impl Fn() -> Value + Send + Sync + 'static,
    ) -> Self {
        self.prices = DescribePrices::from_fn(describe);
        self
    }

    /// The description [`Merchant`](crate::Merchant) was given.
    pub(crate) fn with_described_prices(mut self, prices: DescribePrices) -> Self {
        self.prices = prices;
        self
    }

    /// Serves the endpoints under `prefix` instead of [`DEFAULT_PREFIX`].
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Allows each client address `limit` channel openings per `window` (default 10 a
    /// minute). The address is the peer's from axum's `ConnectInfo` (serve with
    /// `into_make_service_with_connect_info`; without it every client shares one bucket), or
    /// the one a trusted proxy reports (see
    /// [`with_client_ip_header`](Self::with_client_ip_header)). IPv6 addresses count by /64.
    pub fn with_open_rate_limit(mut self, limit: u32, window: Duration) -> Self {
        self.open_limit = limit;
        self.open_window = window;
        self
    }

    /// Behind a reverse proxy you trust: take the client address from the **last** address
    /// in `header` (for example `x-forwarded-for`, which the nearest proxy appends to). Only
    /// set this when every request passes through that proxy: clients can write the header
    /// themselves.
    pub fn with_client_ip_header(mut self, header: http::HeaderName) -> Self {
        self.client_ip_header = Some(header);
        self
    }

    /// How long an opened channel waits for its funding before the proposal is forgotten
    /// (default 10 minutes), and how many proposals one client address may hold at once
    /// (default 20). At most 10 000 proposals are kept in all.
    pub fn with_proposal_limits(mut self, ttl: Duration, per_client: usize) -> Self {
        self.proposal_ttl = ttl;
        self.max_pending_per_client = per_client;
        self
    }

    /// How many proposals the clients of one IPv6 /48 may hold at once, all their /64s
    /// together (default 100: five /64s at the default 20 each). Without it a few hundred /64s,
    /// which one end site holds, fill the 10 000 proposals of all clients; with it that takes
    /// a hundred /48s. IPv4 addresses count one by one, as before.
    pub fn with_network_proposal_limit(mut self, per_network: usize) -> Self {
        self.max_pending_per_network = per_network;
        self
    }

    /// The master key the server keys derive from (the receipts' signer uses it).
    pub(in crate::server) fn master(&self) -> Xpriv {
        self.master
    }

    pub(super) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The negotiation endpoints as an axum router of their own, on `store` (a handle on the
    /// same channels the layer meters: stores are cheap handles on shared state), serving the
    /// terms at `terms_url`. For apps that mount them themselves — with their own middleware,
    /// or apart from the metered routes — instead of through
    /// [`PaywallLayer::with_negotiation`](super::PaywallLayer::with_negotiation).
    ///
    /// # Examples
    ///
    /// ```
    /// use axum::{Router, routing::get};
    /// use paychan::bitcoin::{Network, ScriptBuf, bip32::Xpriv};
    /// use paychan::channel::{ChainTip, Terms};
    /// use paychan::server::{Negotiation, PaywallLayer};
    /// use paychan::{MilliSats, store::MemoryStore, wire::TERMS_PATH};
    /// # use paychan::chain::sim::SimulatedChain;
    ///
    /// # let chain = SimulatedChain::new();
    /// let master = Xpriv::new_master(Network::Regtest, &[1; 32]).unwrap();
    /// let payout = ScriptBuf::from_hex("0014751e76e8199196d454941c45d1b3a323f1433bd6").unwrap();
    /// let (_tip_tx, tip) = tokio::sync::watch::channel(ChainTip { height: 800_000, median_time_past: 0 });
    /// let store = MemoryStore::new();
    /// let negotiation = Negotiation::new(Network::Regtest, Terms::default(), master, payout, chain);
    /// let app: Router = Router::new()
    ///     .route("/joke", get(|| async { "two satoshis walk into a bar" }))
    ///     .layer(PaywallLayer::new(store.clone(), MilliSats::from_msat(2_000), tip.clone()))
    ///     .merge(negotiation.into_router(store, tip, TERMS_PATH));
    /// ```
    pub fn into_router<St: ChannelStore>(
        self,
        store: St,
        tip: watch::Receiver<ChainTip>,
        terms_url: &str,
    ) -> Router {
        self.router(Arc::new(store), tip, terms_url)
    }

    pub(super) fn router<St: ChannelStore>(
        self,
        store: Arc<St>,
        tip: watch::Receiver<ChainTip>,
        terms_url: &str,
    ) -> Router {
        let prefix = self.prefix.clone();
        let state = Arc::new(Shared {
            negotiation: self,
            store,
            tip,
            pending: DashMap::new(),
            opens: DashMap::new(),
            relay_floor: tokio::sync::OnceCell::new(),
        });
        Router::new()
            .route(terms_url, get(open::terms::<C, St>))
            .route(&format!("{prefix}/open"), post(open::open::<C, St>))
            .route(&format!("{prefix}/refund"), post(open::refund::<C, St>))
            .route(&format!("{prefix}/fund"), post(open::fund::<C, St>))
            .route(&format!("{prefix}/channels/{{id}}"), get(close::status::<C, St>))
            .route(&format!("{prefix}/channels/{{id}}/close"), post(close::close::<C, St>))
            .layer(DefaultBodyLimit::max(MAX_BODY))
            .with_state(state)
    }
}

/// Whether two clients (IPv6 by their /64) are in the same IPv6 /48.
fn same_network(a: Option<IpAddr>, b: Option<IpAddr>) -> bool {
    match (a, b) {
        (Some(IpAddr::V6(a)), Some(IpAddr::V6(b))) => (u128::from(a) ^ u128::from(b)) >> 80 == 0,
        _ => false,
    }
}

struct Shared<C, St> {
    negotiation: Negotiation<C>,
    store: Arc<St>,
    tip: watch::Receiver<ChainTip>,
    /// Channels agreed but not yet funded, by key index. Lost on restart: a client whose
    /// proposal vanished opens again (if it broadcast its funding itself, its refund returns
    /// the money at expiry).
    pending: DashMap<u32, Proposal>,
    /// Openings per client address in the current window.
    opens: DashMap<Option<IpAddr>, (Instant, u32)>,
    /// The chain backend's minimum relay fee rate, asked once.
    relay_floor: tokio::sync::OnceCell<bitcoin::FeeRate>,
}

#[derive(Debug, Clone)]
struct Proposal {
    params: ChannelParams,
    /// Set once the refund is signed: the funding transaction it was signed against.
    funding_outpoint: Option<bitcoin::OutPoint>,
    /// Who opened it (for the per-client cap), and when (proposals expire).
    client: Option<IpAddr>,
    created: Instant,
}

impl<C: ChainBackend, St> Shared<C, St> {
    fn key(&self, index: u32) -> Result<SecretKey, Problem> {
        crate::channel::channel_key(&self.negotiation.master, index).map_err(|e| {
            Problem::new(StatusCode::INTERNAL_SERVER_ERROR, ProblemCode::KeyDerivation, e)
        })
    }

    fn tip(&self) -> ChainTip {
        *self.tip.borrow()
    }

    /// The terms in force: the configured ones, with every fee rate raised to at least the
    /// node's minimum relay fee rate, since no package can carry a transaction below it (a
    /// close at a lower rate could never be broadcast).
    async fn terms(&self) -> Result<Terms, Problem> {
        let chain = &self.negotiation.chain;
        let floor = *self
            .relay_floor
            .get_or_try_init(|| chain.min_relay_fee_rate())
            .await
            .map_err(chain_problem)?;
        let mut terms = self.negotiation.terms.clone();
        terms.min_fee_rate = terms.min_fee_rate.max(floor);
        terms.max_fee_rate = terms.max_fee_rate.max(terms.min_fee_rate);
        terms.funding_min_fee_rate = terms.funding_min_fee_rate.max(floor);
        Ok(terms)
    }

    fn allow_open(&self, addr: Option<IpAddr>) -> bool {
        let now = Instant::now();
        let window = self.negotiation.open_window;
        if self.opens.len() >= OPENS_TRACKED {
            self.opens.retain(|_, (start, _)| now.duration_since(*start) < window);
        }
        let mut entry = self.opens.entry(addr).or_insert((now, 0));
        if now.duration_since(entry.0) >= window {
            *entry = (now, 0);
        }
        entry.1 += 1;
        entry.1 <= self.negotiation.open_limit
    }

    /// The client's address: from the trusted proxy header when configured, else the peer's;
    /// IPv6 by its /64, IPv4-mapped IPv6 as IPv4.
    fn client(
        &self,
        connect: Option<Extension<ConnectInfo<SocketAddr>>>,
        headers: &HeaderMap,
    ) -> Option<IpAddr> {
        let addr = match &self.negotiation.client_ip_header {
            Some(name) => headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .next_back()
                .and_then(|last| last.trim().parse::<IpAddr>().ok()),
            None => connect.map(|Extension(ConnectInfo(addr))| addr.ip()),
        }?;
        // An IPv4 peer of a dual-stack listener (`::ffff:a.b.c.d`) is counted as the IPv4
        // address it is, not by the /64 every IPv4 peer shares.
        let addr = match addr {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
            v4 => v4,
        };
        Some(match addr {
            IpAddr::V6(v6) => {
                let mask = u128::MAX << 64;
                IpAddr::V6((u128::from(v6) & mask).into())
            }
            v4 => v4,
        })
    }

    fn live(&self, proposal: &Proposal) -> bool {
        proposal.created.elapsed() < self.negotiation.proposal_ttl
    }

    /// Room for a proposal of `client`: expired proposals are dropped first.
    fn make_room(&self, client: Option<IpAddr>) -> Result<(), Problem> {
        if self.pending.len() >= self.negotiation.max_pending / 2 {
            self.pending.retain(|_, p| self.live(p));
        }
        if self.pending.len() >= self.negotiation.max_pending {
            return Err(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ProblemCode::TooManyPending,
                "try again later",
            ));
        }
        let (mut mine, mut network) = (0, 0);
        for proposal in self.pending.iter().filter(|p| self.live(p)) {
            mine += usize::from(proposal.client == client);
            network += usize::from(same_network(proposal.client, client));
        }
        if mine >= self.negotiation.max_pending_per_client {
            return Err(Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                ProblemCode::TooManyPending,
                "fund or abandon your open proposals first",
            ));
        }
        if network >= self.negotiation.max_pending_per_network {
            return Err(Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                ProblemCode::TooManyPending,
                "your network holds too many open proposals",
            ));
        }
        Ok(())
    }

    fn proposal(&self, index: u32) -> Result<Proposal, Problem> {
        self.pending
            .get(&index)
            .map(|p| p.clone())
            .filter(|p| self.live(p))
            .ok_or_else(unknown_proposal)
    }
}

/// Above this many tracked client addresses, the stale ones are dropped.
const OPENS_TRACKED: usize = 10_000;

/// A JSON body, or a problem document saying what is wrong with it.
fn body<T>(json: Result<Json<T>, JsonRejection>) -> Result<T, Problem> {
    json.map(|Json(value)| value).map_err(|e| bad(ProblemCode::BadRequest, e.body_text()))
}

fn bad(code: ProblemCode, detail: impl fmt::Display) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, code, detail)
}

/// A refusal for breaking the protocol core's rule `code`.
fn broke(code: &'static str, detail: impl fmt::Display) -> Problem {
    bad(ProblemCode::from_static(code), detail)
}

fn unknown_proposal() -> Problem {
    Problem::new(StatusCode::NOT_FOUND, ProblemCode::UnknownProposal, "open a channel first")
}

fn store_problem(error: crate::store::StoreError) -> Problem {
    Problem::new(StatusCode::SERVICE_UNAVAILABLE, ProblemCode::StoreUnavailable, error)
}

fn chain_problem(error: ChainError) -> Problem {
    match error.reject_reason() {
        Some(reason) => {
            bad(ProblemCode::FundingRejected, format_args!("{} ({})", error, reason.code()))
        }
        None => Problem::new(StatusCode::SERVICE_UNAVAILABLE, ProblemCode::ChainUnavailable, error),
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        self.to_response::<axum::body::Body>()
    }
}

fn hex_script(hex: &str) -> Result<ScriptBuf, Problem> {
    ScriptBuf::from_hex(hex).map_err(|e| bad(ProblemCode::BadRequest, format!("script: {e}")))
}

fn hex_tx(hex: &str, what: &str) -> Result<Transaction, Problem> {
    if hex.len() > 200_000 {
        return Err(bad(ProblemCode::BadRequest, format!("{what} is too large")));
    }
    deserialize_hex(hex).map_err(|e| bad(ProblemCode::BadRequest, format!("{what}: {e}")))
}

#[cfg(all(test, feature = "sim"))]
mod tests {
    use super::*;
    use crate::chain::sim::SimulatedChain;
    use crate::store::MemoryStore;
    use crate::wire::TERMS_PATH;
    use tower::ServiceExt as _;

    /// A negotiation router (regtest, 1 000 opens a minute, 2 proposals a client, configured
    /// further by `configure`) and the body of an `/open` it accepts.
    struct Opens {
        app: axum::Router,
        body: String,
    }

    impl Opens {
        fn new(
            configure: impl FnOnce(Negotiation<SimulatedChain>) -> Negotiation<SimulatedChain>,
        ) -> Self {
            let chain = SimulatedChain::new();
            let (tip_tx, tip) = watch::channel(chain.tip());
            std::mem::forget(tip_tx); // the tip stays where it is for the test's life
            let master = Xpriv::new_master(Network::Regtest, &[7; 32]).unwrap();
            let key = |byte: u8| {
                let secret = SecretKey::from_slice(&[byte; 32]).unwrap();
                crate::channel::sig::public_key(&secret)
            };
            let payout = ScriptBuf::new_p2wpkh(&key(2).wpubkey_hash());
            let negotiation =
                Negotiation::new(Network::Regtest, Terms::default(), master, payout, chain.clone())
                    .with_open_rate_limit(1_000, Duration::from_secs(60))
                    .with_proposal_limits(Duration::from_secs(600), 2);
            let app = configure(negotiation).into_router(MemoryStore::new(), tip, TERMS_PATH);
            let body = serde_json::json!({
                "client_pubkey": key(1).to_string(),
                "value_sat": 100_000,
                "expiry": chain.tip().height + 200,
                "client_script": ScriptBuf::new_p2wpkh(&key(1).wpubkey_hash()).to_hex_string(),
            })
            .to_string();
            Self { app, body }
        }

        /// The status of an `/open` built by `edit`, from `peer` when given.
        async fn open(
            &self,
            edit: impl FnOnce(http::request::Builder) -> http::request::Builder,
            peer: Option<SocketAddr>,
        ) -> u16 {
            let request = http::Request::post("/payment-channel/open")
                .header("content-type", "application/json");
            let mut request =
                edit(request).body(axum::body::Body::from(self.body.clone())).unwrap();
            if let Some(peer) = peer {
                request.extensions_mut().insert(ConnectInfo(peer));
            }
            self.app.clone().oneshot(request).await.unwrap().status().as_u16()
        }
    }

    /// Review 2026-12 F11: the /64s of one /48 share a proposal limit; another /48 and IPv4
    /// clients are not held by it.
    #[tokio::test]
    async fn the_64s_of_one_48_share_a_proposal_limit() {
        let opens = Opens::new(|n| {
            n.with_network_proposal_limit(5)
                .with_client_ip_header(http::HeaderName::from_static("x-forwarded-for"))
        });
        let open = async |from: &str| {
            opens.open(|request| request.header("x-forwarded-for", from), None).await
        };
        // Three /64s of 2001:db8:1::/48: 2 + 2 + 1 proposals fill its 5.
        for from in ["2001:db8:1:1::1", "2001:db8:1:1::2", "2001:db8:1:2::1", "2001:db8:1:2::9"] {
            assert_eq!(open(from).await, 200, "{from}");
        }
        assert_eq!(open("2001:db8:1:3::1").await, 200);
        assert_eq!(open("2001:db8:1:4::1").await, 429, "a fresh /64 of the same /48");
        assert_eq!(open("2001:db8:1:ffff::1").await, 429);
        // Another /48 and IPv4 clients still open.
        assert_eq!(open("2001:db8:2:1::1").await, 200);
        for from in ["192.0.2.1", "192.0.2.2", "192.0.2.3"] {
            assert_eq!(open(from).await, 200, "{from}");
        }
    }

    /// Review 2026-12 (server side): on a dual-stack listener (`listen = "[::]:8080"`, Linux's default
    /// `bindv6only = 0`) every IPv4 peer is `::ffff:a.b.c.d`, whose /64 (and /48) is `::`: all
    /// IPv4 clients share one client's proposal and open-rate limits, so one IPv4 client that
    /// holds its 20 proposals blocks every other IPv4 client's open.
    #[tokio::test]
    async fn ipv4_mapped_peers_are_counted_one_by_one() {
        let opens = Opens::new(|n| n);
        let open =
            async |from: &str| opens.open(|request| request, Some(from.parse().unwrap())).await;
        for from in ["[::ffff:192.0.2.1]:40000", "[::ffff:192.0.2.1]:40001"] {
            assert_eq!(open(from).await, 200, "{from}");
        }
        assert_eq!(open("[::ffff:192.0.2.1]:40002").await, 429, "its own limit");
        assert_eq!(open("[::ffff:198.51.100.7]:40000").await, 200, "another IPv4 client");
    }
}
