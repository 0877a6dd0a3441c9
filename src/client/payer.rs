use core::fmt;
use std::sync::{Arc, RwLock};

use bitcoin::bip32::Xpriv;
use bitcoin::consensus::encode::{deserialize_hex, serialize_hex};
use bitcoin::hex::FromHex as _;
use bitcoin::secp256k1::SecretKey;
use bitcoin::{
    Amount, CompressedPublicKey, FeeRate, Network, OutPoint, Psbt, ScriptBuf, Transaction, TxOut,
    Txid, absolute::LockTime, ecdsa,
};
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use serde::Deserialize;
use serde_json::{Value, json};

use super::transport::Transport;
use super::{
    ClientChannel, ClientError, ClientStore, MemoryClientStore, PolicyRefusal, SpendingPolicy,
    Wallet,
};
use crate::MilliSats;
use crate::channel::{ChainTip, ChannelParams, LifetimeBounds, is_standard_payout};
use crate::server::{ChannelSnapshot, OpenResponse as Proposal};
use crate::wire::{ChannelId, PAYMENT_CHANNEL};

/// The client side of channels with one server: opens them, signs every increment, and decides
/// what to do with a 402. [`PaymentLayer`](super::PaymentLayer) and the reqwest middleware
/// drive it; it is cheap to clone and shared by every request.
///
/// It keeps at most one channel with its server at a time. All changes to the channel happen
/// one at a time (single flight): when many requests hit a 402 together, one tops up and the
/// others retry with its payment, so the client's budget is never spent twice.
///
/// # Examples
///
/// ```
/// use bitcoin::Network;
/// use bitcoin::bip32::Xpriv;
/// use paychan::client::{MemoryClientStore, Payer, SpendingPolicy};
///
/// let key = Xpriv::new_master(Network::Regtest, &[7; 32]).unwrap();
/// let payer = Payer::builder("http://127.0.0.1:3000", Network::Regtest, key)
///     .store(MemoryClientStore::new())
///     .policy(SpendingPolicy::default())
///     .build()
///     .unwrap();
/// assert_eq!(payer.origin(), "http://127.0.0.1:3000");
/// ```
pub struct Payer<S = MemoryClientStore> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for Payer<S> {
    fn clone(&self) -> Self {
        Self { inner: Arc::clone(&self.inner) }
    }
}

impl<S> fmt::Debug for Payer<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Payer")
            .field("origin", &self.inner.settings.origin)
            .field("network", &self.inner.settings.network)
            .field("policy", &self.inner.settings.policy)
            .finish_non_exhaustive()
    }
}

/// What a payer is configured with.
#[derive(Debug)]
struct Settings<S> {
    origin: String,
    network: Network,
    key: Xpriv,
    store: S,
    policy: SpendingPolicy,
    wallet: Option<Arc<dyn Wallet>>,
    channel_value: Option<Amount>,
    lifetime_blocks: u32,
    top_up: Option<(MilliSats, Amount)>,
}

struct Inner<S> {
    settings: Settings<S>,
    state: tokio::sync::Mutex<State>,
    current: RwLock<Option<Sent>>,
}

#[derive(Default)]
struct State {
    loaded: bool,
    channel: Option<(ClientChannel, SecretKey)>,
    committed: Amount,
}

/// The payment a request carried: which channel, how much it paid in total, and the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sent {
    pub(crate) id: ChannelId,
    pub(crate) paid: Amount,
    pub(crate) header: HeaderValue,
}

/// What the client already did for one request: it opens at most one channel and tops up at
/// most [`MAX_TOP_UPS`] times (more than once only when concurrent requests drained the
/// balance between its top-up and its retry).
#[derive(Debug, Default)]
pub(crate) struct Acted {
    opened: bool,
    top_ups: u8,
}

/// Top-ups one request may make.
const MAX_TOP_UPS: u8 = 2;

/// A 402 (or other) problem document from the server (RFC 9457).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Problem {
    #[serde(default)]
    pub(crate) code: String,
    #[serde(default)]
    pub(crate) detail: String,
    #[serde(default)]
    pub(crate) price_msat: Option<MilliSats>,
    #[serde(default)]
    pub(crate) channel: Option<ChannelSnapshot>,
}

impl Problem {
    pub(crate) fn parse(body: &[u8]) -> Self {
        serde_json::from_slice(body).unwrap_or_else(|_| Self {
            code: String::new(),
            detail: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
            price_msat: None,
            channel: None,
        })
    }

    fn into_error(self, status: StatusCode) -> ClientError {
        ClientError::Rejected { status, code: self.code, detail: self.detail }
    }
}

/// A channel closed cooperatively by [`Payer::close`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Closed {
    /// The channel.
    pub channel: ChannelId,
    /// The settlement transaction the server broadcast.
    pub txid: Txid,
    /// What it pays the server.
    pub server_amount: Amount,
    /// What it gives back to the client.
    pub client_amount: Amount,
    /// Its fee.
    pub fee: Amount,
}

/// Builds a [`Payer`]; see [`Payer::builder`].
#[derive(Debug)]
#[must_use]
pub struct PayerBuilder<S> {
    settings: Settings<S>,
}

impl PayerBuilder<MemoryClientStore> {
    /// Keeps the channels in `store` instead of in memory. Use a durable store
    /// ([`FileClientStore`](super::FileClientStore)) for real money: it holds the refunds.
    pub fn store<S2: ClientStore>(self, store: S2) -> PayerBuilder<S2> {
        let Settings {
            origin,
            network,
            key,
            policy,
            wallet,
            channel_value,
            lifetime_blocks,
            top_up,
            store: _,
        } = self.settings;
        let settings = Settings {
            origin,
            network,
            key,
            store,
            policy,
            wallet,
            channel_value,
            lifetime_blocks,
            top_up,
        };
        PayerBuilder { settings }
    }
}

impl<S: ClientStore> PayerBuilder<S> {
    /// What the client is willing to spend (default: [`SpendingPolicy::default`]).
    pub fn policy(mut self, policy: SpendingPolicy) -> Self {
        self.settings.policy = policy;
        self
    }

    /// The wallet that funds new channels. Without one, the client pays on channels it
    /// already has and refuses to open new ones ([`ClientError::NoWallet`]).
    pub fn wallet(mut self, wallet: impl Wallet + 'static) -> Self {
        self.settings.wallet = Some(Arc::new(wallet));
        self
    }

    /// The value of the channels the client opens (default: the policy's maximum, within the
    /// server's bounds).
    pub fn channel_value(mut self, value: Amount) -> Self {
        self.settings.channel_value = Some(value);
        self
    }

    /// How many blocks a new channel lives before its refund becomes valid (default 1 008,
    /// about a week; clamped to the server's bounds).
    pub fn lifetime_blocks(mut self, blocks: u32) -> Self {
        self.settings.lifetime_blocks = blocks;
        self
    }

    /// Proactive top-up: when a response's `Payment-Channel-Balance` falls below `threshold`,
    /// sign a payment of `amount` more right away, so the next requests do not meet a 402.
    pub fn top_up_below(mut self, threshold: MilliSats, amount: Amount) -> Self {
        self.settings.top_up = Some((threshold, amount));
        self
    }

    /// Builds the payer.
    ///
    /// # Errors
    ///
    /// [`ClientError::InvalidOrigin`] unless the server is `http://` or `https://` with a
    /// host and nothing after it but an optional `/`.
    pub fn build(mut self) -> Result<Payer<S>, ClientError> {
        self.settings.origin = parse_origin(&self.settings.origin)?;
        Ok(Payer {
            inner: Arc::new(Inner {
                settings: self.settings,
                state: tokio::sync::Mutex::default(),
                current: RwLock::default(),
            }),
        })
    }
}

fn parse_origin(server: &str) -> Result<String, ClientError> {
    let invalid = || ClientError::InvalidOrigin(server.to_owned());
    let uri: Uri = server.parse().map_err(|_| invalid())?;
    match (uri.scheme_str(), uri.authority(), uri.path_and_query().map(|p| p.as_str())) {
        (Some(scheme @ ("http" | "https")), Some(authority), None | Some("/")) => {
            Ok(format!("{scheme}://{authority}"))
        }
        _ => Err(invalid()),
    }
}

/// The server's published terms (`GET /.well-known/payment-channel`), as far as the client
/// uses them.
#[derive(Debug, Deserialize)]
struct ServerTerms {
    network: String,
    min_value_sat: u64,
    max_value_sat: u64,
    lifetime_blocks: LifetimeBounds,
    funding_min_fee_rate_sat_per_vb: u64,
    server_script: String,
    tip: ChainTip,
    endpoints: Endpoints,
}

#[derive(Debug, Deserialize)]
struct Endpoints {
    open: String,
    refund: String,
    fund: String,
    close: String,
}

const WELL_KNOWN: &str = "/.well-known/payment-channel";

fn misbehaved(what: impl Into<String>) -> ClientError {
    ClientError::ServerMisbehaved(what.into())
}

impl Payer<MemoryClientStore> {
    /// Starts a payer for the server at `server` (`scheme://host[:port]`), on `network`, whose
    /// client keys K1 are derived from `key` at hardened indices the store allocates.
    pub fn builder(server: &str, network: Network, key: Xpriv) -> PayerBuilder<MemoryClientStore> {
        PayerBuilder {
            settings: Settings {
                origin: server.to_owned(),
                network,
                key,
                store: MemoryClientStore::new(),
                policy: SpendingPolicy::default(),
                wallet: None,
                channel_value: None,
                lifetime_blocks: 1_008,
                top_up: None,
            },
        }
    }
}

impl<S: ClientStore> Payer<S> {
    /// The server's origin, `scheme://host[:port]`.
    pub fn origin(&self) -> &str {
        &self.inner.settings.origin
    }

    /// The spending policy.
    pub fn policy(&self) -> &SpendingPolicy {
        &self.inner.settings.policy
    }

    /// Whether a request to `uri` goes to this payer's server. Requests elsewhere never carry
    /// the `Payment-Channel` header: it is a bearer credential for the channel's balance.
    pub fn applies_to(&self, uri: &Uri) -> bool {
        match (uri.scheme_str(), uri.authority()) {
            (Some(scheme), Some(authority)) => {
                let origin = &self.inner.settings.origin;
                origin.len() == scheme.len() + 3 + authority.as_str().len()
                    && origin.starts_with(scheme)
                    && origin[scheme.len()..].starts_with("://")
                    && origin.ends_with(authority.as_str())
            }
            _ => false,
        }
    }

    /// The channel the payer pays on, if any.
    ///
    /// # Errors
    ///
    /// [`ClientError::Store`] if the channels cannot be loaded.
    pub async fn channel(&self) -> Result<Option<ClientChannel>, ClientError> {
        let state = self.state().await?;
        Ok(state.channel.as_ref().map(|(channel, _)| channel.clone()))
    }

    /// What the client committed to pay servers, over every channel of its store.
    ///
    /// # Errors
    ///
    /// [`ClientError::Store`] if the channels cannot be loaded.
    pub async fn committed(&self) -> Result<Amount, ClientError> {
        Ok(self.state().await?.committed)
    }

    /// The payment the next request carries.
    pub(crate) async fn current(&self) -> Result<Option<Sent>, ClientError> {
        if let Some(sent) = self.read_current() {
            return Ok(Some(sent));
        }
        drop(self.state().await?);
        Ok(self.read_current())
    }

    fn read_current(&self) -> Option<Sent> {
        self.inner.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn state(&self) -> Result<tokio::sync::MutexGuard<'_, State>, ClientError> {
        let mut state = self.inner.state.lock().await;
        if !state.loaded {
            let channels = self.inner.settings.store.list().await.map_err(ClientError::Store)?;
            state.committed = channels.iter().map(ClientChannel::paid).sum();
            let best = channels
                .into_iter()
                .filter(|c| {
                    c.server == self.inner.settings.origin && !c.retired && c.latest.is_some()
                })
                .max_by_key(|c| c.channel.params().expiry.to_consensus_u32());
            if let Some(channel) = best {
                let key = self.derive(channel.key_index)?;
                self.set_channel(&mut state, Some((channel, key)));
            }
            state.loaded = true;
        }
        Ok(state)
    }

    fn set_channel(&self, state: &mut State, channel: Option<(ClientChannel, SecretKey)>) {
        let sent = channel.as_ref().and_then(|(channel, _)| {
            let header = HeaderValue::from_str(&channel.header()?).ok()?;
            Some(Sent { id: channel.id(), paid: channel.paid(), header })
        });
        state.channel = channel;
        *self.inner.current.write().unwrap_or_else(|p| p.into_inner()) = sent;
    }

    fn derive(&self, index: u32) -> Result<SecretKey, ClientError> {
        crate::channel::channel_key(&self.inner.settings.key, index)
            .map_err(|e| ClientError::Key(e.to_string()))
    }

    async fn call<T: Transport + ?Sized>(
        &self,
        transport: &T,
        method: Method,
        path: &str,
        body: Option<Value>,
        header: Option<&HeaderValue>,
    ) -> Result<Value, ClientError> {
        // Paths come from the server's terms: a path that does not start with `/` could move
        // the request (and the payment header) to another host (`@evil.example/x`).
        if !path.starts_with('/') {
            return Err(misbehaved(format!("endpoint {path:?} is not a path on the origin")));
        }
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.inner.settings.origin))
            .header(http::header::ACCEPT, "application/json");
        if let Some(header) = header {
            request = request.header(PAYMENT_CHANNEL, header);
        }
        let body = match body {
            Some(body) => {
                request = request.header(CONTENT_TYPE, "application/json");
                Bytes::from(body.to_string())
            }
            None => Bytes::new(),
        };
        let request = request.body(body).map_err(|e| ClientError::Transport(e.into()))?;
        let response = transport.send(request).await.map_err(ClientError::Transport)?;
        if !response.status().is_success() {
            return Err(Problem::parse(response.body()).into_error(response.status()));
        }
        serde_json::from_slice(response.body())
            .map_err(|e| misbehaved(format!("{path} answered with invalid JSON: {e}")))
    }

    /// Opens a new channel with the server, funded by the wallet, and makes it the one the
    /// payer pays on. The previous channel, if any, is retired (its refund stays in the store).
    ///
    /// The steps, each checked: fetch the terms; propose the channel with a fresh K1; check
    /// every field of the server's answer against what was asked; have the wallet build the
    /// unsigned funding T1; have the server sign the refund T2 and **verify that signature,
    /// aborting before anything is signed if it is wrong**; save the refund and the first
    /// payment; only then have the wallet sign T1 and hand it to the server with the first
    /// payment.
    ///
    /// # Errors
    ///
    /// [`ClientError::Policy`] if the server's terms or the channel exceed the policy,
    /// [`ClientError::NoWallet`], [`ClientError::Wallet`], [`ClientError::InvalidRefundSignature`],
    /// [`ClientError::ServerMisbehaved`], [`ClientError::Rejected`] if the server refused a step,
    /// [`ClientError::Transport`], [`ClientError::Store`].
    pub async fn open<T: Transport + ?Sized>(
        &self,
        transport: &T,
    ) -> Result<ChannelId, ClientError> {
        let mut state = self.state().await?;
        self.open_locked(transport, &mut state, false).await
    }

    async fn open_locked<T: Transport + ?Sized>(
        &self,
        transport: &T,
        state: &mut State,
        automatic: bool,
    ) -> Result<ChannelId, ClientError> {
        let inner = &self.inner.settings;
        let terms: ServerTerms = serde_json::from_value(
            self.call(transport, Method::GET, WELL_KNOWN, None, None).await?,
        )
        .map_err(|e| misbehaved(format!("terms: {e}")))?;
        if terms.network != inner.network.to_core_arg() {
            return Err(misbehaved(format!(
                "the server is on {}, the client on {}",
                terms.network,
                inner.network.to_core_arg()
            )));
        }
        let min_value = Amount::from_sat(terms.min_value_sat);
        let value = inner
            .channel_value
            .unwrap_or(inner.policy.max_channel_value())
            .min(Amount::from_sat(terms.max_value_sat))
            .max(min_value);
        inner.policy.check_open(value, automatic).map_err(ClientError::Policy)?;
        let bounds = terms.lifetime_blocks;
        if bounds.min > bounds.max {
            return Err(misbehaved("terms: lifetime_blocks.min is above max"));
        }
        let lifetime = inner.lifetime_blocks.clamp(bounds.min, bounds.max);
        inner.policy.check_lifetime(lifetime).map_err(ClientError::Policy)?;
        let wallet = inner.wallet.clone().ok_or(ClientError::NoWallet)?;
        let key_index = inner.store.next_key_index().await.map_err(ClientError::Store)?;
        let client_secret = self.derive(key_index)?;
        let client_key = CompressedPublicKey(client_secret.public_key(crate::channel::secp()));
        let client_script = ScriptBuf::new_p2wpkh(&client_key.wpubkey_hash());
        let expiry = terms.tip.height.saturating_add(lifetime);
        let first = self.first_payment(state, &terms)?;

        let proposal: Proposal = serde_json::from_value(
            self.call(
                transport,
                Method::POST,
                &terms.endpoints.open,
                Some(json!({
                    "client_pubkey": client_key.to_string(),
                    "value_sat": value.to_sat(),
                    "expiry": expiry,
                    "client_script": client_script.to_hex_string(),
                })),
                None,
            )
            .await?,
        )
        .map_err(|e| misbehaved(format!("open: {e}")))?;
        let params = check_proposal(&proposal, &terms, client_key, value, expiry, &client_script)?;

        // The unsigned funding, from the wallet.
        let funding_output =
            TxOut { value: params.value, script_pubkey: params.funding_script_pubkey() };
        let fee_rate = FeeRate::from_sat_per_vb(terms.funding_min_fee_rate_sat_per_vb)
            .ok_or_else(|| misbehaved("funding fee rate"))?;
        // Fee rates the server sets: the funding's, and the channel's (every payment and the
        // refund pay it).
        let policy = &inner.policy;
        policy.check_fee_rate(fee_rate).map_err(ClientError::Policy)?;
        policy.check_fee_rate(params.min_fee_rate).map_err(ClientError::Policy)?;
        let psbt =
            wallet.fund(funding_output.clone(), fee_rate).await.map_err(ClientError::Wallet)?;
        // Between the wallet's unsigned funding and its signature: the refund, signed by the
        // server and verified before anything else is signed, then saved with the first
        // payment. On failure the wallet gets its coins back.
        let prepared = async {
            let outpoint = check_funding_psbt(&psbt, &funding_output)?;

            // The refund, signed by the server and verified before anything else is signed.
            let refund = params.build_refund(outpoint, params.refund_fee());
            let signed = self
                .call(
                    transport,
                    Method::POST,
                    &terms.endpoints.refund,
                    Some(json!({
                        "proposal": proposal.proposal,
                        "funding_tx": serialize_hex(&psbt.unsigned_tx),
                        "refund_tx": serialize_hex(&refund),
                    })),
                    None,
                )
                .await?;
            let signature = signed["signature"]
                .as_str()
                .and_then(|hex| Vec::<u8>::from_hex(hex).ok())
                .and_then(|bytes| ecdsa::Signature::from_slice(&bytes).ok())
                .ok_or(ClientError::InvalidRefundSignature)?;
            params
                .verify_refund_signature(&refund, &signature)
                .map_err(|_| ClientError::InvalidRefundSignature)?;
            let refund = params
                .complete_refund(&refund, &client_secret, &signature)
                .map_err(ClientError::Sign)?;

            // The refund and the first payment are saved before T1 is signed or leaves.
            let mut channel = ClientChannel::new(params.at(outpoint), key_index, refund);
            channel.server = inner.origin.clone();
            let header = channel.pay(&inner.store, &client_secret, first).await?;
            Ok::<_, ClientError>((channel, header, outpoint))
        }
        .await;
        let (channel, header, outpoint) = match prepared {
            Ok(prepared) => prepared,
            Err(e) => {
                wallet.release(&psbt);
                return Err(e);
            }
        };
        let signed = wallet.sign(psbt).await.map_err(ClientError::Wallet)?;
        let funding = extract_funding(signed, outpoint)?;
        self.call(
            transport,
            Method::POST,
            &terms.endpoints.fund,
            Some(json!({
                "proposal": proposal.proposal,
                "funding_tx": serialize_hex(&funding),
                "payment": header,
            })),
            None,
        )
        .await?;
        state.committed += first;
        self.retire(state).await?;
        let id = channel.id();
        self.set_channel(state, Some((channel, client_secret)));
        Ok(id)
    }

    /// The first payment of a new channel: the server output's dust threshold, within budget.
    fn first_payment(&self, state: &State, terms: &ServerTerms) -> Result<Amount, ClientError> {
        let script = ScriptBuf::from_hex(&terms.server_script)
            .map_err(|_| misbehaved("server_script is not hex"))?;
        let first = script.minimal_non_dust();
        self.inner
            .settings
            .policy
            .check_spend(state.committed, first)
            .map_err(ClientError::Policy)?;
        Ok(first)
    }

    /// Marks the current channel retired (saved) and forgets it.
    async fn retire(&self, state: &mut State) -> Result<(), ClientError> {
        if let Some((mut channel, _)) = state.channel.take() {
            channel.retired = true;
            self.inner.settings.store.save(&channel).await.map_err(ClientError::Store)?;
        }
        self.set_channel(state, None);
        Ok(())
    }

    /// Acts on a 402 to a request that carried `sent`: tops up, opens a channel, or (when
    /// another request already did either) nothing; the caller retries. Errors mean the
    /// client cannot or may not pay.
    pub(crate) async fn handle_402<T: Transport + ?Sized>(
        &self,
        transport: &T,
        sent: Option<&Sent>,
        status: StatusCode,
        problem: Problem,
        acted: &mut Acted,
    ) -> Result<(), ClientError> {
        // Check the price before paying anything, for a new channel as for a top-up.
        if let Some(price) = problem.price_msat.or(problem.channel.as_ref().map(|c| c.price_msat)) {
            self.inner.settings.policy.check_price(price).map_err(ClientError::Policy)?;
        }
        let mut state = self.state().await?;
        // Another request changed the channel meanwhile: retry with its payment.
        if self.read_current().as_ref().map(|s| (s.id, s.paid)) != sent.map(|s| (s.id, s.paid)) {
            return Ok(());
        }
        let top_up = match (&state.channel, &problem.channel) {
            (Some((channel, _)), Some(snapshot)) if problem.code == "insufficient-balance" => {
                snapshot.channel == channel.id() && snapshot.min_server_amount_sat.is_some()
            }
            _ => false,
        };
        match problem.code.as_str() {
            // The server did not get the header this request carried (a proxy dropped it?): a
            // new channel would not help.
            "payment-required" if sent.is_some() => Err(problem.into_error(status)),
            "insufficient-balance" if top_up => {
                if acted.top_ups >= MAX_TOP_UPS {
                    return Err(problem.into_error(status));
                }
                acted.top_ups += 1;
                let snapshot = problem.channel.as_ref().expect("checked above");
                self.top_up_locked(&mut state, snapshot).await
            }
            "insufficient-balance"
            | "payment-required"
            | "unknown-channel"
            | "channel-not-open"
            | "payment-channel-closing" => {
                if acted.opened {
                    return Err(problem.into_error(status));
                }
                acted.opened = true;
                self.open_locked(transport, &mut state, true).await.map(drop)
            }
            _ => Err(problem.into_error(status)),
        }
    }

    async fn top_up_locked(
        &self,
        state: &mut State,
        snapshot: &ChannelSnapshot,
    ) -> Result<(), ClientError> {
        let policy = &self.inner.settings.policy;
        policy.check_price(snapshot.price_msat).map_err(ClientError::Policy)?;
        let (channel, key) = state.channel.as_mut().expect("a channel to top up");
        let paid = channel.paid();
        let min = snapshot.min_server_amount_sat.expect("checked by the caller");
        let suggested = snapshot.suggested_server_amount_sat.unwrap_or(min);
        // A hard bound, whatever the server reports: this request's price and the prepaid
        // allowance on top of what was paid (an honest minimum is at most paid + price).
        let most = paid
            .checked_add(snapshot.price_msat.to_sat_ceil())
            .and_then(|need| need.checked_add(policy.max_prepaid()))
            .unwrap_or(Amount::MAX);
        if min > most {
            return Err(ClientError::Policy(PolicyRefusal::TopUpTooLarge {
                asked: min,
                max: most,
            }));
        }
        // Never prepay more than the policy allows beyond what this request needs.
        let bound = snapshot
            .spent_msat
            .checked_add(snapshot.price_msat)
            .map_or(Amount::MAX, MilliSats::to_sat_ceil)
            .checked_add(policy.max_prepaid())
            .unwrap_or(Amount::MAX);
        // Within the budget, prefer the suggestion; the minimum is the least that works.
        let room = policy.max_total().checked_sub(state.committed).unwrap_or(Amount::ZERO);
        let target = suggested
            .min(bound.max(min))
            .min(most)
            .min(channel.channel.params().max_server_amount())
            .min(paid.checked_add(room).unwrap_or(Amount::MAX))
            .max(min);
        if target <= paid {
            // The server has not seen our latest payment yet: sending it again is enough.
            return Ok(());
        }
        policy.check_spend(state.committed, target - paid).map_err(ClientError::Policy)?;
        channel.pay(&self.inner.settings.store, key, target).await?;
        state.committed += target - paid;
        let channel = state.channel.take();
        self.set_channel(state, channel);
        Ok(())
    }

    /// Proactive top-up after a served request that reported `balance`.
    pub(crate) async fn observe_balance(
        &self,
        sent: &Sent,
        balance: MilliSats,
    ) -> Result<(), ClientError> {
        let Some((threshold, amount)) = self.inner.settings.top_up else { return Ok(()) };
        if balance >= threshold {
            return Ok(());
        }
        let mut state = self.state().await?;
        if self.read_current().as_ref() != Some(sent) {
            return Ok(()); // another request already paid more
        }
        let state = &mut *state;
        let Some((channel, key)) = state.channel.as_mut() else { return Ok(()) };
        let paid = channel.paid();
        let target = paid.checked_add(amount).unwrap_or(Amount::MAX);
        let target = target.min(channel.channel.params().max_server_amount());
        if target <= paid {
            return Ok(());
        }
        self.inner
            .settings
            .policy
            .check_spend(state.committed, target - paid)
            .map_err(ClientError::Policy)?;
        channel.pay(&self.inner.settings.store, key, target).await?;
        state.committed += target - paid;
        let channel = state.channel.take();
        self.set_channel(state, channel);
        Ok(())
    }

    /// Asks the server to close the current channel cooperatively: it co-signs the best
    /// payment and broadcasts it. The channel is retired; the settlement is checked against
    /// the client's own latest payment.
    ///
    /// # Errors
    ///
    /// [`ClientError::NoChannel`], [`ClientError::Rejected`], [`ClientError::ServerMisbehaved`]
    /// if the settlement is not the client's latest payment, [`ClientError::Transport`],
    /// [`ClientError::Store`].
    pub async fn close<T: Transport + ?Sized>(&self, transport: &T) -> Result<Closed, ClientError> {
        let mut state = self.state().await?;
        let current = self.read_current().ok_or(ClientError::NoChannel)?;
        let terms: ServerTerms = serde_json::from_value(
            self.call(transport, Method::GET, WELL_KNOWN, None, None).await?,
        )
        .map_err(|e| misbehaved(format!("terms: {e}")))?;
        let path = terms.endpoints.close.replace("{id}", &current.id.to_string());
        let answer = self
            .call(transport, Method::POST, &path, Some(json!({})), Some(&current.header))
            .await?;
        let close: Transaction = answer["close_tx"]
            .as_str()
            .and_then(|hex| deserialize_hex(hex).ok())
            .ok_or_else(|| misbehaved("close: no close_tx"))?;
        let (channel, _) = state.channel.as_ref().ok_or(ClientError::NoChannel)?;
        let latest = channel.latest.as_ref().ok_or(ClientError::NoChannel)?;
        // The settlement must be our latest payment (only the witness differs).
        let unsigned = |tx: &Transaction| {
            let mut tx = tx.clone();
            tx.input.iter_mut().for_each(|input| input.witness.clear());
            tx
        };
        if unsigned(&close) != unsigned(latest) {
            return Err(misbehaved("the settlement is not the client's latest payment"));
        }
        let txid = close.compute_txid();
        if answer["txid"].as_str() != Some(txid.to_string().as_str()) {
            return Err(misbehaved("the settlement's txid does not match"));
        }
        let server_amount = close.output[0].value;
        let client_amount = close.output.get(1).map_or(Amount::ZERO, |o| o.value);
        let fee = channel.channel.params().value - server_amount - client_amount;
        let closed = Closed { channel: current.id, txid, server_amount, client_amount, fee };
        self.retire(&mut state).await?;
        Ok(closed)
    }
}

/// Checks the server's proposal field by field against what the client asked and the terms,
/// and returns the agreed parameters.
fn check_proposal(
    proposal: &Proposal,
    terms: &ServerTerms,
    client_key: CompressedPublicKey,
    value: Amount,
    expiry: u32,
    client_script: &ScriptBuf,
) -> Result<ChannelParams, ClientError> {
    let hex_script = |hex: &str, what: &str| {
        ScriptBuf::from_hex(hex).map_err(|_| misbehaved(format!("{what} is not hex")))
    };
    let server_key: CompressedPublicKey =
        proposal.server_pubkey.parse().map_err(|_| misbehaved("server_pubkey"))?;
    let server_script = hex_script(&proposal.server_script, "server_script")?;
    let rate = |sat: u64| FeeRate::from_sat_per_vb(sat).ok_or_else(|| misbehaved("fee rate"));
    let params = ChannelParams {
        client_key,
        server_key,
        value,
        expiry: LockTime::from_height(expiry).map_err(|_| misbehaved("expiry"))?,
        client_script: client_script.clone(),
        server_script,
        min_fee_rate: rate(proposal.min_fee_rate_sat_per_vb)?,
        max_fee_rate: rate(proposal.max_fee_rate_sat_per_vb)?,
        close_margin: proposal.close_margin,
    };
    let checks = [
        (proposal.value_sat == value.to_sat(), "value_sat differs from the request"),
        (proposal.expiry == expiry, "expiry differs from the request"),
        (hex_script(&proposal.client_script, "client_script")? == *client_script, "client_script"),
        (proposal.server_script == terms.server_script, "server_script differs from the terms"),
        (is_standard_payout(&params.server_script), "server_script is not a standard payout"),
        (server_key != client_key, "server_pubkey is the client's key"),
        (params.min_fee_rate <= params.max_fee_rate, "fee rates"),
        (
            proposal.close_margin < expiry.saturating_sub(terms.tip.height),
            "close_margin exceeds the channel's lifetime",
        ),
        (
            hex_script(&proposal.witness_script, "witness_script")? == params.witness_script(),
            "witness_script is not 2 K1 K2 2 CHECKMULTISIG",
        ),
        (
            hex_script(&proposal.funding_script_pubkey, "funding_script_pubkey")?
                == params.funding_script_pubkey(),
            "funding_script_pubkey",
        ),
        (proposal.refund_fee_sat == params.refund_fee().to_sat(), "refund_fee_sat"),
    ];
    match checks.into_iter().find(|(ok, _)| !ok) {
        Some((_, what)) => Err(misbehaved(format!("open: {what}"))),
        None => Ok(params),
    }
}

/// The funding output's outpoint in the wallet's unsigned PSBT, which must pay the channel
/// exactly once and spend native SegWit outputs only.
fn check_funding_psbt(psbt: &Psbt, funding: &TxOut) -> Result<OutPoint, ClientError> {
    let tx = &psbt.unsigned_tx;
    let bad = |what: &str| ClientError::Wallet(super::WalletError::new(what));
    let mut outputs = tx.output.iter().enumerate().filter(|(_, out)| *out == funding);
    let (Some((vout, _)), None) = (outputs.next(), outputs.next()) else {
        return Err(bad("the funding PSBT must pay the channel output exactly once"));
    };
    if tx.input.is_empty() || psbt.inputs.len() != tx.input.len() {
        return Err(bad("the funding PSBT has no inputs"));
    }
    let segwit = psbt.inputs.iter().all(|input| {
        input.witness_utxo.as_ref().is_some_and(|utxo| utxo.script_pubkey.is_witness_program())
    });
    if !segwit {
        return Err(bad(
            "every funding input must be native SegWit, with its witness_utxo in the PSBT",
        ));
    }
    Ok(OutPoint::new(tx.compute_txid(), vout as u32))
}

/// The signed funding transaction, which must be the transaction the refund spends.
fn extract_funding(psbt: Psbt, outpoint: OutPoint) -> Result<Transaction, ClientError> {
    let tx = psbt.extract_tx().map_err(|e| ClientError::Wallet(super::WalletError::new(e)))?;
    if tx.compute_txid() != outpoint.txid {
        return Err(ClientError::Wallet(super::WalletError::new(
            "signing changed the funding transaction's id",
        )));
    }
    Ok(tx)
}

impl From<PolicyRefusal> for ClientError {
    fn from(refusal: PolicyRefusal) -> Self {
        Self::Policy(refusal)
    }
}
