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
    /// The client's own count of the current channel, and what it pays at most (the one loss
    /// bound every signing path obeys).
    bound: Mutex<LossBound>,
}

impl ChargeWatch {
    /// A fresh watch of `channel` from `baseline`, keeping the verdicts and the last receipt.
    fn for_channel(&self, channel: ChannelId, baseline: Option<MilliSats>) -> Self {
        Self {
            channel: Some(channel),
            baseline,
            overcharged: self.overcharged,
            latest_receipt: self.latest_receipt.clone(),
            bad_receipt: self.bad_receipt.clone(),
            open_streams: self.open_streams,
            last_send: self.last_send,
            ..Self::default()
        }
    }

    /// What the channel may have spent by now, beyond the baseline: `max` for each request
    /// not receipted, the receipts' prices, what the streams delivered, and `slack` for
    /// each stream still running. `None` before a baseline.
    fn allowed_spent(&self, max: MilliSats, prepaid: MilliSats) -> Option<MilliSats> {
        let baseline = self.baseline?;
        let unreceipted = self.sends.saturating_sub(self.receipts);
        Some(
            baseline
                .saturating_add(self.slack)
                .saturating_add(self.receipted)
                .saturating_add(max.checked_mul(unreceipted).unwrap_or(MilliSats::MAX))
                .saturating_add(self.streamed)
                .saturating_add(
                    prepaid.checked_mul(u64::from(self.open_streams)).unwrap_or(MilliSats::MAX),
                ),
        )
    }
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

/// What the server charged on the current channel, checked against the policy's
/// `max_per_request`: the server's reported balance gives a lower bound of what it spent
/// (`paid by the request's payment − balance`), which may not grow by more than
/// `max_per_request` per request the client sent on the channel.
#[derive(Debug, Default)]
struct ChargeWatch {
    channel: Option<ChannelId>,
    /// The spent the judgement starts from: zero for a channel this payer opened, the first
    /// report for a channel loaded from the store (earlier requests are not known).
    baseline: Option<MilliSats>,
    /// Allowed beyond the baseline from the start: `max_prepaid` when the baseline is a
    /// report (a server of several nodes serving from leases reports what other nodes used
    /// of theirs only once they settle it, so a first report may miss up to the prepaid
    /// balance they hold), zero for a channel this payer opened.
    slack: MilliSats,
    /// Requests sent on the channel since tracking started.
    sends: u64,
    /// Set once the server charged more than the policy allows: the payer stops paying it.
    overcharged: Option<(MilliSats, MilliSats)>,
    /// Receipts received on the channel, and the sum of the prices they state.
    receipts: u64,
    receipted: MilliSats,
    /// The last valid receipt, on any channel.
    latest_receipt: Option<Receipt>,
    /// The last balance the server reported, with what the payment its request carried paid.
    reported: Option<(MilliSats, MilliSats)>,
    /// Set once a receipt did not verify or add up: the payer stops paying the server.
    bad_receipt: Option<String>,
    /// Metered streams running (on any channel): each may have been debited up to
    /// `max_prepaid` beyond what the client has read of it.
    open_streams: u32,
    /// What the channel's streams delivered, by the client's own count.
    streamed: MilliSats,
    /// Whether a stream on the channel was cut before the server ended it (its unread units
    /// are allowed once per channel).
    cut: bool,
    /// When the last request left (on any channel).
    last_send: Option<Instant>,
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

/// A receipt (`value`) that verifies under `sent`'s K2, for its channel and for `method
/// path_and_query`; or why not.
pub(super) fn verified_receipt(
    sent: &CurrentPayment,
    value: &[u8],
    method: &str,
    path_and_query: &str,
    prev: Option<[u8; 32]>,
) -> Result<Receipt, String> {
    let receipt = Receipt::decode(value)
        .and_then(|receipt| receipt.verify(&sent.server_key).map(|()| receipt))
        .map_err(|e| e.to_string())?;
    if receipt.channel != sent.id {
        Err("the receipt is for another channel".to_owned())
    } else if !receipt.is_for(method, path_and_query) {
        Err("the receipt is for another request".to_owned())
    } else if receipt.prev_digest() != prev || receipt.prev.is_some() != prev.is_some() {
        Err("the receipt does not link to the receipt the request named".to_owned())
    } else {
        Ok(receipt)
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
        let charges = self.charges();
        let balance = charges
            .reported
            .filter(|_| charges.channel == Some(channel.id()))
            .map(|(_, balance)| balance);
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

    /// Refuses to pay a server that charged more than the policy allows.
    pub(crate) fn check_trusted(&self) -> Result<(), ClientError> {
        let charges = self.charges();
        if let Some((charged, allowed)) = charges.overcharged {
            return Err(ClientError::Overcharged { charged, allowed });
        }
        match &charges.bad_receipt {
            Some(why) => Err(misbehaved(MisbehaviorKind::BadReceipt, why.clone())),
            None => Ok(()),
        }
    }

    /// A request leaves with a payment of `channel`.
    pub(crate) fn note_send(&self, channel: ChannelId) {
        let mut charges = self.charges();
        if charges.channel != Some(channel) {
            *charges = charges.for_channel(channel, None);
        }
        charges.sends += 1;
        charges.last_send = Some(Instant::now());
    }

    /// Whether nothing was sent for `idle` since `since` (or the last request, if later) and
    /// no stream runs.
    pub(super) fn idle_since(&self, since: Instant, idle: std::time::Duration) -> bool {
        let charges = self.charges();
        let last = charges.last_send.map_or(since, |sent| sent.max(since));
        charges.open_streams == 0 && last.elapsed() >= idle
    }

    /// The server answered a request that carried `sent` with `balance` left: checks what it
    /// charged since tracking started against `max_per_request` per request sent.
    pub(crate) fn note_answer(&self, sent: &CurrentPayment, balance: MilliSats) {
        let max = self.inner.settings.policy.max_per_request();
        let mut charges = self.charges();
        if charges.channel != Some(sent.id) {
            return;
        }
        let paid = MilliSats::from_sat(sent.paid).unwrap_or(MilliSats::MAX);
        charges.reported = Some((paid, balance));
        let spent = paid.saturating_sub(balance);
        let baseline = match charges.baseline {
            Some(baseline) => baseline,
            // The first report on a channel loaded from the store sets the baseline, but only
            // from an answer to the current payment: an older one under-reports what was spent.
            None if self.read_current().as_ref() == Some(sent) => {
                charges.slack = self.max_prepaid_msat();
                *charges.baseline.insert(spent)
            }
            None => return,
        };
        let charged = spent.saturating_sub(baseline);
        let prepaid = self.max_prepaid_msat();
        let allowed = max
            .checked_mul(charges.sends)
            .unwrap_or(MilliSats::MAX)
            .saturating_add(charges.slack)
            .saturating_add(charges.streamed)
            .saturating_add(
                prepaid.checked_mul(u64::from(charges.open_streams)).unwrap_or(MilliSats::MAX),
            );
        if charged > allowed && charges.overcharged.is_none() {
            tracing::warn!(%charged, %allowed, "the server charged more than the policy allows");
            charges.overcharged = Some((charged, allowed));
        }
    }

    /// The policy's `max_prepaid`, in msat.
    pub(super) fn max_prepaid_msat(&self) -> MilliSats {
        MilliSats::from_sat(self.inner.settings.policy.max_prepaid()).unwrap_or(MilliSats::MAX)
    }

    /// Starts watching a channel this payer just opened: nothing spent yet.
    fn watch_new_channel(&self, channel: ChannelId) {
        let mut charges = self.charges();
        *charges = charges.for_channel(channel, Some(MilliSats::ZERO));
        // A new channel is activity: the idle close does not close it at once.
        charges.last_send = Some(Instant::now());
    }

    /// The server answered a request that carried `sent` with the receipt `value`: it must
    /// verify under the channel's K2, be for this channel, this request and the payment it
    /// carried, charge at most `max_per_request`, and the channel's spent it states may not
    /// exceed what the receipts so far charged (plus `max_per_request` for each request not
    /// receipted yet). Otherwise the payer stops paying the server.
    pub(crate) fn note_receipt(
        &self,
        sent: &CurrentPayment,
        value: &[u8],
        method: &str,
        path_and_query: &str,
        prev: Option<[u8; 32]>,
    ) {
        let max = self.inner.settings.policy.max_per_request();
        let paid = MilliSats::from_sat(sent.paid).unwrap_or(MilliSats::MAX);
        let checked =
            verified_receipt(sent, value, method, path_and_query, prev).and_then(|receipt| {
                if receipt.paid_msat != paid {
                    Err(format!(
                        "the receipt says {} was paid, the request carried {paid}",
                        receipt.paid_msat
                    ))
                } else if receipt.price_msat > max {
                    Err(format!(
                        "the receipt charges {}, above the policy's {max}",
                        receipt.price_msat
                    ))
                } else {
                    Ok(receipt)
                }
            });
        let mut charges = self.charges();
        let receipt = match checked {
            Ok(receipt) => receipt,
            Err(why) => {
                tracing::warn!(%why, "a receipt that does not verify");
                charges.bad_receipt.get_or_insert(why);
                return;
            }
        };
        if charges.channel == Some(sent.id) {
            charges.receipts += 1;
            charges.receipted = charges.receipted.saturating_add(receipt.price_msat);
            if let Some(allowed) = charges.allowed_spent(max, self.max_prepaid_msat())
                && receipt.spent() > allowed
            {
                let why = format!(
                    "the receipt says {} spent, its receipts add up to {allowed}",
                    receipt.spent()
                );
                tracing::warn!(%why, "receipts that do not add up");
                charges.bad_receipt.get_or_insert(why);
                return;
            }
        }
        charges.latest_receipt = Some(receipt);
    }

    /// A paid answer, or a stream, came without a receipt: with
    /// [`require_receipts`](PayerBuilder::require_receipts) the payer stops paying the server.
    pub(crate) fn note_missing_receipt(&self, what: &str) {
        if self.inner.settings.require_receipts {
            tracing::warn!(what, "a receipt is required");
            self.charges()
                .bad_receipt
                .get_or_insert_with(|| format!("{what}, and receipts are required"));
        }
    }

    /// What the server last reported spent on `channel`: its latest receipt's, or the
    /// payment the answer's request carried minus the balance it reported.
    pub(super) fn reported_spent(&self, channel: ChannelId) -> Option<MilliSats> {
        let charges = self.charges();
        if let Some(receipt) = charges.latest_receipt.as_ref().filter(|r| r.channel == channel) {
            return Some(receipt.spent());
        }
        // The balance with the payment of the same answer: a top-up signed since then must
        // not count as spent.
        let (paid, balance) = charges.reported.filter(|_| charges.channel == Some(channel))?;
        Some(paid.saturating_sub(balance))
    }

    /// The digest of the latest verified receipt on `channel`: what the next request links
    /// its receipt to.
    pub(crate) fn latest_receipt_digest(&self, channel: ChannelId) -> Option<[u8; 32]> {
        let charges = self.charges();
        charges.latest_receipt.as_ref().filter(|r| r.channel == channel)?.digest()
    }

    /// The last receipt the server signed and this payer verified: proof of what the channel
    /// had been charged when it was issued (see [`Receipt`]).
    pub fn latest_receipt(&self) -> Option<Receipt> {
        self.charges().latest_receipt.clone()
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
