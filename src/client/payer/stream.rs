//! Paying while a response streams: in-band top-ups, top-ups ahead of a byte stream, and the
//! stream's receipt.

use bitcoin::Amount;
use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderValue, Method};

use super::top_up::Ask;
use super::{CurrentPayment, MisbehaviorKind, Payer, misbehaved};
use crate::MilliSats;
use crate::client::{ClientError, ClientStore, Transport};
use crate::wire::{ChannelId, PaymentAnswer, Problem, ProblemCode, Receipt};

impl<S: ClientStore> Payer<S> {
    /// Answers a metered stream's request for more money — the problem document of a
    /// `payment-required` SSE event, or of a WebSocket text frame — through the payer's
    /// [transport](super::PayerBuilder::transport). The tower layer and the reqwest middleware
    /// do this by themselves for SSE responses.
    ///
    /// # Errors
    ///
    /// As [`top_up_via`](Self::top_up_via), or [`ClientError::NoTransport`].
    pub async fn top_up(&self, problem: &Problem) -> Result<PaymentAnswer, ClientError> {
        self.top_up_via(&*self.own_transport()?, problem).await
    }

    /// [`top_up`](Self::top_up) through `transport`: pays what `problem` asks for, as for a
    /// 402 (the unit's price within `max_per_request`, the top-up within `max_prepaid` beyond
    /// what the channel spent and within `max_total`), and hands the payment over on the
    /// server's payment endpoint (`POST <prefix>/payment`), which stores it and charges
    /// nothing; the held stream then resumes.
    ///
    /// # Errors
    ///
    /// [`ClientError::Rejected`] with `problem` itself when it is not a top-up request for
    /// the payer's channel; [`ClientError::Policy`] when the policy forbids it; why the
    /// payment could not be made or handed over.
    pub async fn top_up_via<T: Transport + ?Sized>(
        &self,
        transport: &T,
        problem: &Problem,
    ) -> Result<PaymentAnswer, ClientError> {
        self.top_up_capped(transport, problem, None, None).await.1
    }

    /// [`top_up_via`](Self::top_up_via), adding at most `cap` to what the channel pays, on
    /// channel `on` only when given: what the payer's own state says the top-up added —
    /// also when the hand-over failed, since the server may hold the payment anyway — and
    /// the answer.
    pub(crate) async fn top_up_capped<T: Transport + ?Sized>(
        &self,
        transport: &T,
        problem: &Problem,
        cap: Option<Amount>,
        on: Option<ChannelId>,
    ) -> (Amount, Result<PaymentAnswer, ClientError>) {
        match self.sign_top_up(problem, cap, on).await {
            Ok(added) => (added, self.hand_over(transport).await),
            Err(error) => (Amount::ZERO, Err(error)),
        }
    }

    /// Signs the top-up `problem` asks for (see [`top_up_capped`](Self::top_up_capped)):
    /// what it added.
    async fn sign_top_up(
        &self,
        problem: &Problem,
        cap: Option<Amount>,
        on: Option<ChannelId>,
    ) -> Result<Amount, ClientError> {
        self.check_trusted()?;
        let policy = &self.inner.settings.policy;
        if let Some(price) = problem.price_msat {
            policy.check_price(price).map_err(ClientError::Policy)?;
        }
        let mut state = self.state().await?;
        let snapshot = match (&state.channel, &problem.channel) {
            (Some((channel, _)), Some(snapshot))
                if problem.code == ProblemCode::InsufficientBalance
                    && snapshot.channel == channel.id()
                    && on.is_none_or(|on| on == channel.id())
                    && snapshot.min_server_amount_sat.is_some() =>
            {
                snapshot.clone()
            }
            _ => return Err(problem.clone().into()),
        };
        let before = state.channel.as_ref().map_or(Amount::ZERO, |(c, _)| c.paid());
        self.top_up_locked(&mut state, &super::top_up::quoted(*snapshot, problem), cap).await?;
        Ok(state.channel.as_ref().map_or(Amount::ZERO, |(c, _)| c.paid()) - before)
    }

    /// Pays `amount` more on the current channel (within the policy's `max_total`, and at
    /// most what the channel's [`LossBound`](crate::client::LossBound) allows ahead of any
    /// request: what the client counted plus `max_prepaid`, so it may add less than asked) and
    /// hands the payment over on the payment endpoint, through the payer's
    /// [transport](super::PayerBuilder::transport): a top-up ahead of what a stream will cost,
    /// for a byte stream or a WebSocket whose price the client knows.
    ///
    /// # Errors
    ///
    /// As [`top_up_by_via`](Self::top_up_by_via), or [`ClientError::NoTransport`];
    /// [`ClientError::BoundExceeded`] when the bound leaves nothing to add.
    pub async fn top_up_by(&self, amount: Amount) -> Result<PaymentAnswer, ClientError> {
        self.top_up_by_via(&*self.own_transport()?, amount).await
    }

    /// [`top_up_by`](Self::top_up_by) through `transport`.
    ///
    /// # Errors
    ///
    /// [`ClientError::NoChannel`] without a channel; [`ClientError::Policy`] beyond
    /// `max_total`; why the payment could not be made or handed over.
    pub async fn top_up_by_via<T: Transport + ?Sized>(
        &self,
        transport: &T,
        amount: Amount,
    ) -> Result<PaymentAnswer, ClientError> {
        let channel = self.current().await?.ok_or(ClientError::NoChannel)?.id;
        self.top_up_by_on(transport, channel, amount).await.1
    }

    /// [`top_up_by_via`](Self::top_up_by_via) on `channel` only (a stream's; the payer may
    /// have moved on): what was added (also when the hand-over failed) and the answer.
    pub(crate) async fn top_up_by_on<T: Transport + ?Sized>(
        &self,
        transport: &T,
        id: ChannelId,
        amount: Amount,
    ) -> (Amount, Result<PaymentAnswer, ClientError>) {
        match self.sign_ahead(id, amount).await {
            Ok(added) => (added, self.hand_over(transport).await),
            Err(error) => (Amount::ZERO, Err(error)),
        }
    }

    async fn sign_ahead(&self, id: ChannelId, amount: Amount) -> Result<Amount, ClientError> {
        let mut state = self.state().await?;
        let (channel, _) = state.channel.as_ref().ok_or(ClientError::NoChannel)?;
        if channel.id() != id {
            return Err(ClientError::NoChannel);
        }
        let (before, max) = (channel.paid(), channel.channel.params().max_server_amount());
        let target = before.checked_add(amount).unwrap_or(max).min(max);
        self.pay_more(&mut state, target, Ask::AHEAD).await?;
        let added = state.channel.as_ref().map_or(before, |(c, _)| c.paid()) - before;
        if added == Amount::ZERO && amount > Amount::ZERO {
            // The bound left no room: say so rather than hand the same payment over again.
            let bound = self.bound();
            if bound.allowed(MilliSats::ZERO) <= before {
                let asked = before.checked_add(amount).unwrap_or(Amount::MAX);
                bound
                    .check(id, asked, MilliSats::ZERO, None)
                    .map_err(ClientError::BoundExceeded)?;
            }
        }
        Ok(added)
    }

    /// Hands the current payment over on the server's payment endpoint.
    async fn hand_over<T: Transport + ?Sized>(
        &self,
        transport: &T,
    ) -> Result<PaymentAnswer, ClientError> {
        let current = self.current().await?.ok_or(ClientError::NoChannel)?;
        let terms = self.terms(transport).await?;
        if terms.endpoints.payment.is_empty() {
            return Err(misbehaved(
                MisbehaviorKind::InvalidAnswer,
                "the server's terms name no payment endpoint",
            ));
        }
        let answer: PaymentAnswer = self
            .call(
                transport,
                Method::POST,
                &terms.endpoints.payment,
                None::<&()>,
                Some(&current.header),
            )
            .await?;
        if answer.channel != current.id {
            return Err(misbehaved(
                MisbehaviorKind::InvalidAnswer,
                "the payment endpoint answered for another channel",
            ));
        }
        Ok(answer)
    }

    /// A metered stream started: until it ends, answers may report up to `max_prepaid` more
    /// spent than counted (units the server debited and sent that the client has not read
    /// yet).
    pub(crate) fn stream_started(&self) {
        self.charges().stream_started();
    }

    /// A metered stream on `sent`'s channel ended (see
    /// [`ChargeWatch::stream_ended`](crate::client::charges::ChargeWatch::stream_ended)).
    pub(crate) fn stream_ended(&self, sent: &CurrentPayment, early: bool) {
        self.charges().stream_ended(sent.id, early);
    }

    /// A stream on `sent`'s channel delivered units worth `cost` (the client's own count):
    /// the server may have spent that much more than the requests account for.
    pub(crate) fn note_streamed(&self, sent: &CurrentPayment, cost: MilliSats) {
        self.bound().streamed(sent.id, cost);
        self.charges().note_streamed(sent.id, cost);
    }

    /// Starts a metered stream the payer's HTTP integrations do not read themselves — a
    /// WebSocket, say: the [`PaidStream`] gives the `Payment-Channel` header for the
    /// handshake, answers the server's top-up requests and checks its receipt.
    ///
    /// # Errors
    ///
    /// [`ClientError::NoChannel`] without a channel (open one first); why the payer will not
    /// pay this server.
    pub async fn stream(
        &self,
        method: &Method,
        path_and_query: &str,
    ) -> Result<PaidStream<S>, ClientError> {
        self.check_trusted()?;
        let sent = self.current().await?.ok_or(ClientError::NoChannel)?;
        self.note_send(sent.id);
        self.stream_started();
        Ok(PaidStream {
            payer: self.clone(),
            sent,
            method: method.to_string(),
            path: path_and_query.to_owned(),
            delivered: AtomicU64::new(0),
            added: AtomicU64::new(0),
        })
    }

    /// The receipt that ends a metered stream of `method path_and_query`, sent with `sent`:
    /// it must verify under K2, be for this channel and this request, state a payment at
    /// least the one the request carried, charge at most `bound` (what the client counted),
    /// and a spent within what the charge watch allows. It becomes the latest receipt; a bad
    /// one stops the payer, as for any receipt.
    pub(crate) fn note_stream_receipt(
        &self,
        sent: &CurrentPayment,
        value: &[u8],
        (method, path_and_query): (&str, &str),
        prev: Option<[u8; 32]>,
        bound: MilliSats,
    ) -> Result<Receipt, ClientError> {
        let request = (method, path_and_query);
        let checked =
            self.charges().note_stream_receipt(&sent.watched(), value, request, prev, bound);
        if let Err(why) = &checked {
            tracing::warn!(%why, "a stream's receipt that does not verify");
        }
        Ok(checked?)
    }
}

/// A metered stream the caller reads itself (a WebSocket): from [`Payer::stream`]. The charge
/// watch pauses while it lives (see [`Payer::top_up`] for what bounds a stream's cost).
///
/// # Examples
///
/// ```no_run
/// # async fn listen(payer: paychan::client::Payer) -> Result<(), paychan::client::ClientError> {
/// use http::Method;
/// use paychan::wire::Problem;
///
/// let stream = payer.stream(&Method::GET, "/listen").await?;
/// let header = stream.header().clone(); // for the WebSocket handshake
/// # let frame = String::new();
/// // A text frame with a problem document: the server waits for a top-up.
/// if let Ok(problem) = serde_json::from_str::<Problem>(&frame) {
///     stream.top_up(&problem).await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct PaidStream<S: ClientStore> {
    payer: Payer<S>,
    sent: CurrentPayment,
    method: String,
    path: String,
    /// What the caller reported received, and what the stream's top-ups added (msat).
    delivered: AtomicU64,
    added: AtomicU64,
}

impl<S: ClientStore> PaidStream<S> {
    /// The `Payment-Channel` value to open the stream with.
    pub fn header(&self) -> &HeaderValue {
        &self.sent.header
    }

    /// Reports units received worth `cost` at the price the caller agreed to: what the
    /// stream's top-ups may add grows by it.
    pub fn received(&self, cost: MilliSats) {
        self.delivered.fetch_add(cost.to_msat(), Ordering::Relaxed);
        self.payer.note_streamed(&self.sent, cost);
    }

    /// Answers the server's top-up request (see [`Payer::top_up`]), through the payer's
    /// transport. The stream's top-ups together add at most what was
    /// [`received`](Self::received), the unit asked for (its price within
    /// `max_per_request`) and the policy's `max_prepaid`: a server that asks again and again
    /// without sending gets nothing more.
    ///
    /// # Errors
    ///
    /// As [`Payer::top_up`]; [`ClientError::Policy`] beyond the stream's budget.
    pub async fn top_up(&self, problem: &Problem) -> Result<PaymentAnswer, ClientError> {
        let msat = |n: &AtomicU64| MilliSats::from_msat(n.load(Ordering::Relaxed));
        let prepaid =
            MilliSats::from_sat(self.payer.policy().max_prepaid()).unwrap_or(MilliSats::MAX);
        let room = msat(&self.delivered)
            .saturating_add(problem.price_msat.unwrap_or(MilliSats::ZERO))
            .saturating_add(prepaid)
            .saturating_sub(msat(&self.added));
        let transport = self.payer.own_transport()?;
        let cap = Some(room.to_sat_floor());
        let (added, answer) =
            self.payer.top_up_capped(&*transport, problem, cap, Some(self.sent.id)).await;
        let added = MilliSats::from_sat(added).unwrap_or(MilliSats::MAX);
        // Counted also when the hand-over failed: the server may hold the payment.
        self.added.fetch_add(added.to_msat(), Ordering::Relaxed);
        answer
    }

    /// Checks the receipt that ends the stream (the encoded [`Receipt`]) and keeps it as the
    /// payer's latest (see [`Payer::latest_receipt`]).
    ///
    /// # Errors
    ///
    /// [`ClientError::ServerMisbehaved`] (`BadReceipt`) when it does not verify or is not for
    /// this stream; the payer then stops paying the server.
    pub fn receipt(&self, value: &[u8]) -> Result<Receipt, ClientError> {
        // The price up front and the unit in flight, each within `max_per_request`.
        let max = self.payer.policy().max_per_request();
        let bound = MilliSats::from_msat(self.delivered.load(Ordering::Relaxed))
            .saturating_add(max)
            .saturating_add(max);
        let request = (self.method.as_str(), self.path.as_str());
        self.payer.note_stream_receipt(&self.sent, value, request, None, bound)
    }
}

impl<S: ClientStore> Drop for PaidStream<S> {
    fn drop(&mut self) {
        // The caller cannot tell the payer whether the server ended the stream: allowed as
        // if it may not have.
        self.payer.stream_ended(&self.sent, true);
    }
}
