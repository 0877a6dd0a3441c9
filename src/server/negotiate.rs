//! The negotiation endpoints: terms, open, refund, fund, status and cooperative close.
// Handlers fail with the problem document they answer with (152 bytes), on cold paths only.
#![allow(clippy::result_large_err)]

use core::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bitcoin::absolute::LockTime;
use bitcoin::bip32::Xpriv;
use bitcoin::consensus::encode::{deserialize_hex, serialize_hex};
use bitcoin::hex::DisplayHex as _;
use bitcoin::secp256k1::SecretKey;
use bitcoin::{Amount, CompressedPublicKey, Network, ScriptBuf, Transaction, TxOut};
use dashmap::DashMap;
use serde_json::Value;
use tokio::sync::watch;

use crate::MilliSats;
use crate::chain::{ChainBackend, ChainError, RejectReason};
use crate::channel::{
    ChainTip, ChannelParams, ChannelState, CloseError, FundingPolicy, PaymentError, Terms,
};
use crate::store::{ChannelRecord, ChannelStore};
use crate::wire::{
    self, ChannelId, ChannelSnapshot, CloseResponse, Endpoints, FundRequest, FundResponse,
    OpenRequest, OpenResponse, PAYMENT_CHANNEL, Problem, ProblemCode, RefundRequest,
    RefundResponse, TermsDocument,
};

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
    proposal_ttl: Duration,
    client_ip_header: Option<http::HeaderName>,
    prices: Value,
    funding: FundingPolicy,
}

/// The most inputs a funding transaction may have (each is looked up on the chain backend).
pub(crate) const MAX_FUNDING_INPUTS: usize = 64;

/// The largest negotiation request body: 256 KiB, whatever limit the host application sets.
const MAX_BODY: usize = 256 * 1024;

impl<C: ChainBackend + Clone + 'static> Negotiation<C> {
    /// Negotiates channels on `network` under `terms`, deriving keys from `master`, paying
    /// the server to `payout_script`, broadcasting through `chain`.
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
            proposal_ttl: Duration::from_secs(600),
            client_ip_header: None,
            prices: Value::Null,
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

    pub(super) fn prefix(&self) -> &str {
        &self.prefix
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
            .route(terms_url, get(terms::<C, St>))
            .route(&format!("{prefix}/open"), post(open::<C, St>))
            .route(&format!("{prefix}/refund"), post(refund::<C, St>))
            .route(&format!("{prefix}/fund"), post(fund::<C, St>))
            .route(&format!("{prefix}/channels/{{id}}"), get(status::<C, St>))
            .route(&format!("{prefix}/channels/{{id}}/close"), post(close::<C, St>))
            .layer(DefaultBodyLimit::max(MAX_BODY))
            .with_state(state)
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
    /// IPv6 by its /64.
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
        let mine = self.pending.iter().filter(|p| p.client == client && self.live(p)).count();
        if mine >= self.negotiation.max_pending_per_client {
            return Err(Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                ProblemCode::TooManyPending,
                "fund or abandon your open proposals first",
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

async fn terms<C: ChainBackend, St: ChannelStore>(
    State(s): State<Arc<Shared<C, St>>>,
) -> Result<Json<TermsDocument>, Problem> {
    let t = s.terms().await?;
    let n = &s.negotiation;
    Ok(Json(TermsDocument {
        version: 1,
        scheme: "bitcoin-channel".to_owned(),
        network: n.network.to_core_arg().to_owned(),
        prices: n.prices.clone(),
        min_value_sat: t.min_value.to_sat(),
        max_value_sat: t.max_value.to_sat(),
        lifetime_blocks: t.blocks,
        lifetime_seconds: Some(t.seconds),
        min_fee_rate_sat_per_vb: t.min_fee_rate.to_sat_per_vb_ceil(),
        max_fee_rate_sat_per_vb: t.max_fee_rate.to_sat_per_vb_floor(),
        funding_min_fee_rate_sat_per_vb: t.funding_min_fee_rate.to_sat_per_vb_ceil(),
        dust_limit_sat: n.payout_script.minimal_non_dust().to_sat(),
        server_script: n.payout_script.to_hex_string(),
        tip: s.tip(),
        endpoints: Endpoints::under(&n.prefix),
    }))
}

async fn open<C: ChainBackend, St: ChannelStore>(
    State(s): State<Arc<Shared<C, St>>>,
    connect: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    req: Result<Json<OpenRequest>, JsonRejection>,
) -> Result<Json<OpenResponse>, Problem> {
    let req = body(req)?;
    let client = s.client(connect, &headers);
    if !s.allow_open(client) {
        return Err(Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            ProblemCode::RateLimited,
            "too many channel openings",
        ));
    }
    s.make_room(client)?;
    let client_key: CompressedPublicKey = req
        .client_pubkey
        .parse()
        .map_err(|e| bad(ProblemCode::BadRequest, format!("client_pubkey: {e}")))?;
    let client_script = hex_script(&req.client_script)?;
    let terms = s.terms().await?;
    let index = s.store.next_key_index().await.map_err(store_problem)?;
    let server_key = CompressedPublicKey(s.key(index)?.public_key(crate::channel::secp()));
    let params = terms
        .agree(
            client_key,
            server_key,
            Amount::from_sat(req.value_sat),
            LockTime::from_consensus(req.expiry),
            client_script,
            s.negotiation.payout_script.clone(),
            s.tip(),
        )
        .map_err(|e| broke(e.code(), e))?;
    let response = OpenResponse {
        proposal: index,
        server_pubkey: server_key.to_string(),
        witness_script: params.witness_script().to_hex_string(),
        funding_script_pubkey: params.funding_script_pubkey().to_hex_string(),
        funding_address: params.funding_address(s.negotiation.network).to_string(),
        value_sat: params.value.to_sat(),
        expiry: params.expiry.to_consensus_u32(),
        close_margin: params.close_margin,
        client_script: params.client_script.to_hex_string(),
        server_script: params.server_script.to_hex_string(),
        min_fee_rate_sat_per_vb: params.min_fee_rate.to_sat_per_vb_ceil(),
        max_fee_rate_sat_per_vb: params.max_fee_rate.to_sat_per_vb_floor(),
        refund_fee_sat: params.refund_fee().to_sat(),
        payment_fee_sat: params.payment_fee(true).to_sat(),
        min_server_amount_sat: params.min_server_amount().to_sat(),
    };
    s.pending.insert(
        index,
        Proposal { params, funding_outpoint: None, client, created: Instant::now() },
    );
    Ok(Json(response))
}

async fn refund<C: ChainBackend, St: ChannelStore>(
    State(s): State<Arc<Shared<C, St>>>,
    req: Result<Json<RefundRequest>, JsonRejection>,
) -> Result<Json<RefundResponse>, Problem> {
    let req = body(req)?;
    let funding = hex_tx(&req.funding_tx, "funding_tx")?;
    let refund = hex_tx(&req.refund_tx, "refund_tx")?;
    let mut proposal =
        s.pending.get_mut(&req.proposal).filter(|p| s.live(p)).ok_or_else(unknown_proposal)?;
    let checked = proposal
        .params
        .check_refund(&s.negotiation.terms, &funding, &refund, s.tip())
        .map_err(|e| broke(e.code(), e))?;
    let outpoint = checked.funding_outpoint();
    let signature = checked
        .sign(&s.key(req.proposal)?)
        .map_err(|e| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, ProblemCode::Signing, e))?;
    proposal.funding_outpoint = Some(outpoint);
    Ok(Json(RefundResponse {
        channel: ChannelId::new(outpoint),
        signature: signature.to_vec().to_lower_hex_string(),
    }))
}

async fn fund<C: ChainBackend, St: ChannelStore>(
    State(s): State<Arc<Shared<C, St>>>,
    req: Result<Json<FundRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<FundResponse>), Problem> {
    let req = body(req)?;
    let funding = hex_tx(&req.funding_tx, "funding_tx")?;
    let payment = wire::decode_payment(req.payment.as_bytes()).map_err(|e| broke(e.code(), e))?;
    let proposal = match s.proposal(req.proposal) {
        Ok(proposal) => proposal,
        // A retry of a /fund that succeeded: answer as then.
        Err(unknown) => return already_funded(&s, &funding, &payment).await.ok_or(unknown)?,
    };
    let outpoint = proposal.funding_outpoint.ok_or_else(|| {
        Problem::new(
            StatusCode::CONFLICT,
            ProblemCode::RefundNotSigned,
            "have the refund signed first",
        )
    })?;
    // Checks that need no chain backend come first.
    let found = funding.compute_txid();
    if found != outpoint.txid {
        let e = crate::channel::FundingError::TxidMismatch { expected: outpoint.txid, found };
        return Err(broke(e.code(), e));
    }
    if funding.input.len() > MAX_FUNDING_INPUTS {
        return Err(bad(
            ProblemCode::FundingTooManyInputs,
            format_args!("at most {MAX_FUNDING_INPUTS} inputs"),
        ));
    }
    let params = proposal.params;
    let channel = params.clone().at(outpoint);
    // With no best payment, every valid payment is an increase.
    if let Err(e) = channel.check_payment(None, &payment, s.tip()) {
        return Err(broke(e.code(), e));
    }
    let chain = &s.negotiation.chain;
    let policy = &s.negotiation.funding;
    let state = match chain.unspent(&outpoint).await.map_err(chain_problem)? {
        // Already broadcast (a /fund whose record could not be stored, retried): the node
        // took the funding, so only its output is left to check.
        Some(utxo) => {
            if utxo.output.script_pubkey != params.funding_script_pubkey()
                || utxo.output.value != params.value
            {
                let e = crate::channel::FundingError::WrongOutputScript;
                return Err(broke(e.code(), e));
            }
            if utxo.confirmations >= policy.min_confirmations() {
                ChannelState::Open
            } else {
                ChannelState::Pending
            }
        }
        None => {
            let mut prevouts: Vec<TxOut> = Vec::with_capacity(funding.input.len());
            let mut depths = Vec::with_capacity(funding.input.len());
            for input in &funding.input {
                let utxo = chain
                    .unspent(&input.previous_output)
                    .await
                    .map_err(chain_problem)?
                    .ok_or_else(|| bad(ProblemCode::FundingMissingInputs, input.previous_output))?;
                prevouts.push(utxo.output);
                depths.push(utxo.confirmations);
            }
            params
                .check_funding(&s.terms().await?, outpoint, &funding, &prevouts)
                .map_err(|e| broke(e.code(), e))?;
            // Broadcast before the channel exists: a channel is never open without its funding.
            chain.broadcast(&funding).await.map_err(chain_problem)?;
            policy.initial_state(params.value, &funding, &depths)
        }
    };
    let record = ChannelRecord::open(channel, req.proposal, payment)
        .with_funded_at(s.tip().height)
        .with_state(state);
    let id = record.id();
    let balance = record.balance();
    match s.store.create(record).await {
        Ok(()) | Err(crate::store::StoreError::AlreadyExists) => {}
        Err(e) => return Err(store_problem(e)),
    }
    s.pending.remove(&req.proposal);
    Ok((StatusCode::CREATED, Json(FundResponse { channel: id, balance_msat: balance })))
}

/// The answer to a repeated `/fund` of a channel that exists: same funding, same first
/// payment.
async fn already_funded<C, St: ChannelStore>(
    s: &Shared<C, St>,
    funding: &Transaction,
    payment: &Transaction,
) -> Option<Result<(StatusCode, Json<FundResponse>), Problem>> {
    let outpoint = payment.input.first()?.previous_output;
    if outpoint.txid != funding.compute_txid() {
        return None;
    }
    let id = ChannelId::new(outpoint);
    let record = match s.store.load(id).await {
        Ok(record) => record?,
        Err(e) => return Some(Err(store_problem(e))),
    };
    // Only the holder of the first payment gets the answer again.
    record.channel.verify_client_signature(payment).ok()?;
    Some(Ok((
        StatusCode::CREATED,
        Json(FundResponse { channel: id, balance_msat: record.balance() }),
    )))
}

/// The `{id}` of the path: a percent-decoding failure is a problem document like any other.
fn parse_id(id: Result<Path<String>, PathRejection>) -> Result<ChannelId, Problem> {
    let Path(id) = id.map_err(|e| bad(ProblemCode::BadRequest, e.body_text()))?;
    id.parse().map_err(|e| bad(ProblemCode::BadRequest, e))
}

async fn load<C, St: ChannelStore>(
    s: &Shared<C, St>,
    id: ChannelId,
) -> Result<ChannelRecord, Problem> {
    s.store
        .load(id)
        .await
        .map_err(store_problem)?
        .ok_or_else(|| Problem::new(StatusCode::NOT_FOUND, ProblemCode::UnknownChannel, id))
}

async fn status<C: ChainBackend, St: ChannelStore>(
    State(s): State<Arc<Shared<C, St>>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<ChannelSnapshot>, Problem> {
    let record = load(&s, parse_id(id)?).await?;
    Ok(Json(record.snapshot(MilliSats::ZERO, MilliSats::ZERO)))
}

/// `POST {prefix}/channels/{id}/close`: the caller proves it is the client by sending a
/// payment of the channel in the `Payment-Channel` header.
async fn close<C: ChainBackend, St: ChannelStore>(
    State(s): State<Arc<Shared<C, St>>>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<CloseResponse>), Problem> {
    let id = parse_id(id)?;
    let record = load(&s, id).await?;
    let proof = headers.get(PAYMENT_CHANNEL).ok_or_else(|| {
        Problem::new(
            StatusCode::UNAUTHORIZED,
            ProblemCode::PaymentRequired,
            "send a payment of this channel",
        )
    })?;
    let proof = wire::decode_payment(proof.as_bytes()).map_err(|e| broke(e.code(), e))?;
    match proof.input.first().map(|i| i.previous_output) {
        Some(outpoint) if outpoint == id.outpoint() => {}
        Some(found) => {
            let e = PaymentError::WrongOutpoint { found };
            return Err(broke(e.code(), e));
        }
        None => {
            let e = PaymentError::InputCount { found: 0 };
            return Err(broke(e.code(), e));
        }
    }
    record.channel.verify_client_signature(&proof).map_err(|e| broke(e.code(), e))?;
    // Only the client's latest payment closes: an old header someone captured does not.
    let best = record.paid_amount();
    let proven = crate::channel::server_amount(&proof);
    if best > proven {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            ProblemCode::StaleProof,
            format_args!("the payment pays {proven}, the latest {best}: send the latest to close"),
        ));
    }
    if matches!(record.state, ChannelState::Pending | ChannelState::Open) {
        s.store.transition(id, record.state, ChannelState::Closing).await.map_err(store_problem)?;
    }
    // Read again: from `Closing` on the best payment is frozen, so this close is the one the
    // settlement task would build (a payment may have landed before the transition).
    let record = load(&s, id).await?;
    let close = record.close_transaction(&s.negotiation.master).map_err(|e| match e {
        CloseError::NoPayment => bad(ProblemCode::NoPayment, "nothing to close"),
        e => Problem::new(StatusCode::INTERNAL_SERVER_ERROR, ProblemCode::Close, e),
    })?;
    let txid = close.compute_txid();
    // The close is queued (the settlement task retries it); try to broadcast it now.
    let status = match record.state {
        ChannelState::Closing => try_broadcast(&s, id, &close).await?,
        ChannelState::Closed | ChannelState::Settled => StatusCode::OK,
        state => {
            return Err(Problem::new(
                StatusCode::CONFLICT,
                ProblemCode::ChannelNotOpen,
                format_args!("the channel is {}", state.as_str()),
            ));
        }
    };
    let state =
        if status == StatusCode::ACCEPTED { ChannelState::Closing } else { ChannelState::Closed };
    Ok((
        status,
        Json(CloseResponse {
            channel: id,
            txid,
            server_amount_sat: record.paid_amount().to_sat(),
            close_tx: serialize_hex(&close),
            state,
        }),
    ))
}

/// Broadcasts a queued close: 200 and `Closed` once the chain took it; 202 when it did not
/// (the channel stays `Closing` and the settlement task retries with backoff).
async fn try_broadcast<C: ChainBackend, St: ChannelStore>(
    s: &Shared<C, St>,
    id: ChannelId,
    close: &Transaction,
) -> Result<StatusCode, Problem> {
    match s.negotiation.chain.broadcast(close).await {
        Ok(_) | Err(ChainError::Rejected { reason: RejectReason::AlreadyConfirmed, .. }) => {
            s.store
                .transition(id, ChannelState::Closing, ChannelState::Closed)
                .await
                .map_err(store_problem)?;
            Ok(StatusCode::OK)
        }
        Err(_) => Ok(StatusCode::ACCEPTED),
    }
}
