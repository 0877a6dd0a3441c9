//! [`Payer`]: the client side of channels with one server. Built in `builder.rs`; opens in
//! `open.rs`; reacts to 402s and tops up in `top_up.rs`; closes in `close.rs`.

use core::fmt;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use bitcoin::Amount;
use bitcoin::secp256k1::SecretKey;
use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Uri};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::charges::{ChargeWatch, SentPayment};
use super::steps::{Misbehavior, MisbehaviorKind};
use super::transport::Transport;
use super::{
    ClientChannel, ClientError, ClientStore, LossBound, MemoryClientStore, SpendingPolicy,
};
use crate::MilliSats;
use crate::wire::{
    ChannelId, PAYMENT_CHANNEL, PriceList, Problem, Receipt, TERMS_PATH, TermsDocument,
};

mod builder;
mod close;
mod open;
mod stream;
mod top_up;

pub use builder::PayerBuilder;
use builder::Settings;
pub use close::Closed;
pub use stream::PaidStream;
pub(crate) use top_up::RetryBudget;

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
/// use paychan::bitcoin::{Network, bip32::Xpriv};
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

struct Inner<S> {
    settings: Settings,
    store: S,
    state: tokio::sync::Mutex<State>,
    current: RwLock<Option<CurrentPayment>>,
    charges: Mutex<ChargeWatch>,
    /// When the last request left (on any channel), for the idle close.
    last_send: Mutex<Option<Instant>>,
    /// The client's own count of the current channel, and what it pays at most (the one loss
    /// bound every signing path obeys).
    bound: Mutex<LossBound>,
}

impl State {
    /// What counts against the policy's `max_total`: payments and funding fees.
    fn spent(&self) -> Amount {
        self.committed.checked_add(self.fees).unwrap_or(Amount::MAX)
    }
}

/// The payer's channel, changed under its lock only.
#[derive(Default)]
struct State {
    loaded: bool,
    channel: Option<(ClientChannel, SecretKey)>,
    committed: Amount,
    /// What the client paid in funding fees, over every channel of its store.
    fees: Amount,
    /// When the client opened channels by itself (for the policy's `max_opens`).
    opens: VecDeque<Instant>,
}

/// The payer's current channel as the caller may want to see it; see [`Payer::status`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChannelStatus {
    /// The channel.
    pub channel: ChannelId,
    /// What the latest payment pays the server.
    pub paid: Amount,
    /// The balance the server last reported (`Payment-Channel-Balance`), if any.
    pub balance: Option<MilliSats>,
    /// What a close with the latest payment returns to the client (its change output).
    pub close_returns: Amount,
    /// The refund's lock time: the client's coins come back by themselves from then on.
    pub expiry: bitcoin::absolute::LockTime,
}

/// The payment the next request carries: which channel, how much it pays in total, and its
/// header, encoded once when the payment was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CurrentPayment {
    pub(crate) id: ChannelId,
    pub(crate) paid: Amount,
    pub(crate) header: HeaderValue,
    /// The channel's server key K2: it signs the server's receipts.
    pub(crate) server_key: bitcoin::secp256k1::PublicKey,
}

impl CurrentPayment {
    /// The payment as the charge watch judges its answers.
    pub(crate) fn watched(&self) -> SentPayment {
        SentPayment::new(self.id, self.paid, self.server_key)
    }
}

pub(super) fn misbehaved(kind: MisbehaviorKind, what: impl Into<String>) -> ClientError {
    ClientError::ServerMisbehaved(Misbehavior::new(kind, what))
}

impl<S: ClientStore> Payer<S> {
    /// The transport given to the builder, for the calls made outside a request.
    pub(crate) fn own_transport(&self) -> Result<Arc<dyn Transport>, ClientError> {
        let own = self.inner.settings.transport.as_ref().ok_or(ClientError::NoTransport)?;
        Ok(Arc::clone(&own.0))
    }

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

    /// The current channel: what it paid, what the server last reported left, what a close
    /// would return, and when the refund becomes valid. `None` without a channel.
    ///
    /// # Errors
    ///
    /// [`ClientError::Store`] if the channels cannot be loaded.
    pub async fn status(&self) -> Result<Option<ChannelStatus>, ClientError> {
        let state = self.state().await?;
        let Some((channel, _)) = state.channel.as_ref() else { return Ok(None) };
        let close_returns = channel
            .latest
            .as_ref()
            .and_then(|tx| tx.output.get(1))
            .map_or(Amount::ZERO, |out| out.value);
        let balance = self.charges().reported_balance(channel.id());
        Ok(Some(ChannelStatus {
            channel: channel.id(),
            paid: channel.paid(),
            balance,
            close_returns,
            expiry: channel.channel.params().expiry,
        }))
    }

    pub(super) fn bound(&self) -> std::sync::MutexGuard<'_, LossBound> {
        self.inner.bound.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The server quoted `price` for `method path` in a 402 challenge.
    pub(crate) fn note_quote(&self, method: &str, path: &str, price: MilliSats) {
        if self.inner.settings.policy.check_price(price).is_ok() {
            self.bound().quote(method, path, price);
        }
    }

    /// The server answered `method path`, sent with `sent`, with `status`; `metered` when the
    /// answer says it was paid for. Counts it (see [`LossBound::served`]); whether it counted
    /// as a paid unit.
    pub(crate) fn note_served(
        &self,
        sent: &CurrentPayment,
        (method, path): (&str, &str),
        status: u16,
        metered: bool,
    ) -> bool {
        self.bound().served(sent.id, method, path, status, metered).is_some()
    }

    fn charges(&self) -> std::sync::MutexGuard<'_, ChargeWatch> {
        self.inner.charges.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refuses to pay a server that charged more than the policy allows, or signed a receipt
    /// that does not verify or add up.
    pub(crate) fn check_trusted(&self) -> Result<(), ClientError> {
        Ok(self.charges().check()?)
    }

    /// A request leaves with a payment of `channel`.
    pub(crate) fn note_send(&self, channel: ChannelId) {
        self.charges().note_send(channel);
        *self.last_send() = Some(Instant::now());
    }

    fn last_send(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.inner.last_send.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether nothing was sent for `idle` since `since` (or the last request, if later) and
    /// no stream runs.
    pub(super) fn idle_since(&self, since: Instant, idle: std::time::Duration) -> bool {
        let streams = self.charges().open_streams();
        let last = self.last_send().map_or(since, |sent| sent.max(since));
        streams == 0 && last.elapsed() >= idle
    }

    /// The server answered a request that carried `sent` with `balance` left: checks what it
    /// charged since tracking started against `max_per_request` per request sent.
    pub(crate) fn note_answer(&self, sent: &CurrentPayment, balance: MilliSats) {
        let current = self.read_current().as_ref() == Some(sent);
        let mut charges = self.charges();
        let trusted = charges.check().is_ok();
        charges.note_answer(&sent.watched(), balance, current);
        if let (true, Err(why)) = (trusted, charges.check()) {
            tracing::warn!(%why, "the server charged more than the policy allows");
        }
    }

    /// Starts watching a channel this payer just opened: nothing spent yet.
    fn watch_new_channel(&self, channel: ChannelId) {
        self.charges().watch_new(channel);
        // A new channel is activity: the idle close does not close it at once.
        *self.last_send() = Some(Instant::now());
    }

    /// The server answered a request of `method path_and_query` that carried `sent` with the
    /// receipt `value` (see
    /// [`ChargeWatch::note_receipt`](super::charges::ChargeWatch::note_receipt)): a bad one stops the payer.
    pub(crate) fn note_receipt(
        &self,
        sent: &CurrentPayment,
        value: &[u8],
        method: &str,
        path_and_query: &str,
        prev: Option<[u8; 32]>,
    ) {
        let request = (method, path_and_query);
        if let Err(why) = self.charges().note_receipt(&sent.watched(), value, request, prev) {
            tracing::warn!(%why, "a receipt that does not verify or add up");
        }
    }

    /// A paid answer, or a stream, came without a receipt: with
    /// [`require_receipts`](PayerBuilder::require_receipts) the payer stops paying the server.
    pub(crate) fn note_missing_receipt(&self, what: &str) {
        if self.charges().note_missing_receipt(what) {
            tracing::warn!(what, "a receipt is required");
        }
    }

    /// What the server last reported spent on `channel`: its latest receipt's, or the
    /// payment the answer's request carried minus the balance it reported.
    pub(super) fn reported_spent(&self, channel: ChannelId) -> Option<MilliSats> {
        self.charges().reported_spent(channel)
    }

    /// The digest of the latest verified receipt on `channel`: what the next request links
    /// its receipt to.
    pub(crate) fn latest_receipt_digest(&self, channel: ChannelId) -> Option<[u8; 32]> {
        self.charges().latest_receipt_digest(channel)
    }

    /// What a request on `channel` says in `Payment-Receipt-Unsigned`.
    pub(crate) fn unsigned_receipts(&self, channel: ChannelId) -> crate::wire::UnsignedReceipts {
        self.charges().unsigned_receipts(channel)
    }

    /// The last receipt the server signed and this payer verified: proof of what the channel
    /// had been charged when it was issued (see [`Receipt`]; a server signing in batches
    /// sends unsigned receipts in between, which state the same but prove nothing).
    pub fn latest_receipt(&self) -> Option<Receipt> {
        self.charges().latest_signed_receipt().cloned()
    }

    /// What the client paid in funding fees, over every channel of its store (part of the
    /// policy's budget with [`committed`](Self::committed)).
    ///
    /// # Errors
    ///
    /// [`ClientError::Store`] if the channels cannot be loaded.
    pub async fn funding_fees(&self) -> Result<Amount, ClientError> {
        Ok(self.state().await?.fees)
    }

    /// The payment the next request carries.
    pub(crate) async fn current(&self) -> Result<Option<CurrentPayment>, ClientError> {
        if let Some(current) = self.read_current() {
            return Ok(Some(current));
        }
        drop(self.state().await?);
        Ok(self.read_current())
    }

    fn read_current(&self) -> Option<CurrentPayment> {
        self.inner.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn state(&self) -> Result<tokio::sync::MutexGuard<'_, State>, ClientError> {
        let mut state = self.inner.state.lock().await;
        if !state.loaded {
            let channels = self.inner.store.list().await.map_err(ClientError::Store)?;
            state.committed = channels.iter().map(ClientChannel::paid).sum();
            state.fees = channels.iter().map(|c| c.funding_fee).sum();
            let best = channels
                .into_iter()
                .filter(|c| {
                    c.server == self.inner.settings.origin && !c.retired && c.latest.is_some()
                })
                .max_by_key(|c| c.channel.params().expiry.to_consensus_u32());
            if let Some(channel) = best {
                let key = self.derive(channel.key_index)?;
                let header = channel.header();
                let (id, paid) = (channel.id(), channel.paid());
                self.set_channel(&mut state, Some((channel, key)), header);
                self.bound().resume(id, paid);
            }
            state.loaded = true;
        }
        Ok(state)
    }

    /// Makes `channel` the one the next requests pay on, with `header` its latest payment's
    /// encoding.
    fn set_channel(
        &self,
        state: &mut State,
        channel: Option<(ClientChannel, SecretKey)>,
        header: Option<String>,
    ) {
        if let Some((channel, _)) = &channel {
            let mut bound = self.bound();
            if bound.channel() != Some(channel.id()) {
                // A channel opened now starts from its first payment (one loaded from the
                // store is resumed by `state`).
                bound.start(channel.id(), channel.paid());
            }
        }
        let current = channel.as_ref().zip(header).and_then(|((channel, _), header)| {
            let header = HeaderValue::try_from(header).ok()?;
            let server_key = channel.channel.params().server_key.0;
            Some(CurrentPayment { id: channel.id(), paid: channel.paid(), header, server_key })
        });
        state.channel = channel;
        *self.inner.current.write().unwrap_or_else(|p| p.into_inner()) = current;
    }

    fn derive(&self, index: u32) -> Result<SecretKey, ClientError> {
        crate::channel::channel_key(&self.inner.settings.key, index).map_err(ClientError::Key)
    }

    /// Marks the current channel retired (saved) and forgets it; `closed` when its money is
    /// back or settled.
    async fn retire(&self, state: &mut State, closed: bool) -> Result<(), ClientError> {
        if let Some((mut channel, _)) = state.channel.take() {
            channel.retired = true;
            channel.closed |= closed;
            self.inner.store.save(&channel).await.map_err(ClientError::Store)?;
        }
        self.set_channel(state, None, None);
        Ok(())
    }

    /// The server's terms.
    async fn terms<T: Transport + ?Sized>(
        &self,
        transport: &T,
    ) -> Result<TermsDocument, ClientError> {
        let terms: TermsDocument =
            self.call(transport, Method::GET, TERMS_PATH, None::<&()>, None).await?;
        self.bound().price_list(PriceList::from_terms(&terms.prices));
        Ok(terms)
    }

    /// Sends one negotiation request to `path` on the origin and reads its typed answer; a
    /// refusal is [`ClientError::Rejected`].
    async fn call<T, Req, Resp>(
        &self,
        transport: &T,
        method: Method,
        path: &str,
        body: Option<&Req>,
        header: Option<&HeaderValue>,
    ) -> Result<Resp, ClientError>
    where
        T: Transport + ?Sized,
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        // Paths come from the server's terms: a path that does not start with `/` could move
        // the request (and the payment header) to another host (`@evil.example/x`).
        if !path.starts_with('/') {
            return Err(misbehaved(
                MisbehaviorKind::ForeignEndpoint,
                format!("endpoint {path:?} is not a path on the origin"),
            ));
        }
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.inner.settings.origin))
            .header(ACCEPT, "application/json");
        if let Some(header) = header {
            request = request.header(PAYMENT_CHANNEL, header);
        }
        let body = match body {
            Some(body) => {
                request = request.header(CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(body).map_err(|e| ClientError::Transport(e.into()))?)
            }
            None => Bytes::new(),
        };
        let request = request.body(body).map_err(|e| ClientError::Transport(e.into()))?;
        // The payer's channel is locked while it negotiates: a server that never answers must
        // not hold every request of this payer.
        let timeout = self.inner.settings.timeout;
        let response = tokio::time::timeout(timeout, transport.send(request))
            .await
            .map_err(|_| {
                ClientError::Transport(format!("{path}: no answer in {timeout:?}").into())
            })?
            .map_err(ClientError::Transport)?;
        if !response.status().is_success() {
            return Err(Problem::from_body(response.status(), response.body()).into());
        }
        serde_json::from_slice(response.body()).map_err(|e| {
            misbehaved(
                MisbehaviorKind::InvalidAnswer,
                format!("{path} answered with invalid JSON: {e}"),
            )
        })
    }
}
