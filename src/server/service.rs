use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::BoxError;
use axum::body::{Bytes, HttpBody};
use http::{HeaderValue, Request, Response};
use http_body_util::BodyExt;
use tower::{Service, ServiceExt};

use super::future::ResponseFuture;
use super::layer::{Config, PaywallLayer, VERIFIED_CACHE_LIMIT};
use super::rejection::{Rejection, RejectionKind};
use super::{ActualCost, Paid, Pricing};
use crate::MilliSats;
use crate::channel::{PaymentCheck, PaymentError};
use crate::store::{ChannelRecord, ChannelState, ChannelStore, Debit};
use crate::wire::{self, ChannelId, PAYMENT_CHANNEL, PAYMENT_CHANNEL_BALANCE};

/// Middleware that charges every priced request to a payment channel. See the
/// [module docs](super) for the request flow.
pub struct Paywall<S, St, P> {
    pub(super) inner: S,
    pub(super) config: Arc<Config<St, P>>,
}

impl<S, St, P> Paywall<S, St, P> {
    /// Wraps `inner` with the configuration of `layer`.
    pub fn new(inner: S, layer: &PaywallLayer<St, P>) -> Self {
        Self { inner, config: layer.config.clone() }
    }

    /// Returns a reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Returns a mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Returns the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, St, P> Clone for Paywall<S, St, P> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone(), config: self.config.clone() }
    }
}

impl<S: fmt::Debug, St, P> fmt::Debug for Paywall<S, St, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Paywall").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl<S, St, P, ReqBody, ResBody> Service<Request<ReqBody>> for Paywall<S, St, P>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: ChannelStore,
    P: Pricing<ReqBody>,
    ReqBody: HttpBody<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: From<String> + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, Result<Response<ResBody>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        if let Some((prefix, router)) = &self.config.negotiation
            && is_negotiation(request.uri().path(), prefix, &self.config.terms_url)
        {
            let router = router.clone();
            return ResponseFuture::metered(negotiate(router, request));
        }
        let Some(price) = self.config.pricing.price(&request) else {
            return ResponseFuture::free(self.inner.call(request));
        };
        // Use the service that was driven to readiness; leave a fresh clone in its place
        // (https://docs.rs/tower/latest/tower/trait.Service.html#be-careful-when-cloning-inner-services).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let config = self.config.clone();
        ResponseFuture::metered(config.serve(inner, request, price))
    }
}

fn is_negotiation(path: &str, prefix: &str, terms_url: &str) -> bool {
    path == terms_url || path.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('/'))
}

/// Answers a negotiation request with the crate's own router, converting the bodies.
async fn negotiate<ReqBody, ResBody, E>(
    router: axum::Router,
    request: Request<ReqBody>,
) -> Result<Response<ResBody>, E>
where
    ReqBody: HttpBody<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: From<String>,
{
    let request = request.map(|body| axum::body::Body::new(body.map_err(Into::into)));
    let response = match router.oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let (parts, body) = response.into_parts();
    // Negotiation answers are small JSON documents built by this crate.
    let bytes = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    Ok(Response::from_parts(parts, ResBody::from(String::from_utf8_lossy(&bytes).into_owned())))
}

impl<St: ChannelStore, P> Config<St, P> {
    async fn serve<S, ReqBody, ResBody>(
        self: Arc<Self>,
        mut inner: S,
        mut request: Request<ReqBody>,
        price: MilliSats,
    ) -> Result<Response<ResBody>, S::Error>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        ResBody: From<String>,
    {
        // Taken out so that the request (whose body need not be `Sync`) is not borrowed
        // across an await.
        let header = request.headers().get(PAYMENT_CHANNEL).cloned();
        let paid = match self.charge(header, price).await {
            Ok(paid) => paid,
            Err(rejection) => return Ok(rejection.into_response(&self.terms_url)),
        };
        request.extensions_mut().insert(paid);
        if !self.forward_payment_header {
            // A bearer proof of the channel: the inner service (a proxy, a logger) has no
            // business with it.
            request.headers_mut().remove(PAYMENT_CHANNEL);
        }
        let mut response = inner.call(request).await?;
        let give_back = if self.refund_server_errors && response.status().is_server_error() {
            price
        } else {
            response
                .extensions()
                .get::<ActualCost>()
                .map_or(MilliSats::ZERO, |ActualCost(cost)| price.saturating_sub(*cost))
        };
        let mut balance = paid.balance;
        if give_back > MilliSats::ZERO {
            // If the store fails here the client stays charged for this request; the
            // channel's money is safe either way.
            if let Ok(after) = self.store.credit(paid.channel, give_back).await {
                balance = after;
            }
        }
        response
            .headers_mut()
            .insert(PAYMENT_CHANNEL_BALANCE, HeaderValue::from(balance.to_msat()));
        Ok(response)
    }

    /// Identifies the channel, stores a better payment before anything is served, and debits
    /// the price atomically.
    async fn charge(
        &self,
        header: Option<HeaderValue>,
        price: MilliSats,
    ) -> Result<Paid, Rejection> {
        let reject = |kind, record: Option<&ChannelRecord>| {
            Rejection::new(kind, record.map(|r| r.snapshot(price, self.bundle))).with_price(price)
        };
        let header = header.ok_or_else(|| reject(RejectionKind::PaymentRequired, None))?;
        if let Some(id) = self.verified.get(&header).map(|id| *id) {
            return self.debit(id, price, None).await;
        }
        let payment = wire::decode_payment(header.as_bytes())
            .map_err(|e| reject(RejectionKind::Header(e), None))?;
        let outpoint =
            payment.input.first().map(|input| input.previous_output).ok_or_else(|| {
                reject(RejectionKind::Payment(PaymentError::InputCount { found: 0 }), None)
            })?;
        let id = ChannelId::new(outpoint);
        let record = self
            .store
            .load(id)
            .await
            .map_err(|e| Rejection::from(e).with_price(price))?
            .ok_or_else(|| reject(RejectionKind::UnknownChannel, None))?;
        match record.state {
            ChannelState::Open => {}
            ChannelState::Pending => {
                return Err(reject(RejectionKind::ChannelPending, Some(&record)));
            }
            state => return Err(reject(RejectionKind::ChannelNotOpen(state), Some(&record))),
        }
        let tip = *self.tip.borrow();
        let is_best = record.best.as_ref() == Some(&payment);
        let cache = match record.channel.check_payment(record.best.as_ref(), &payment, tip) {
            // Stale means a concurrent request stored an even better payment: fine.
            Ok(PaymentCheck::Increase { .. }) => {
                let _stored_or_stale = self
                    .store
                    .store_payment(id, payment)
                    .await
                    .map_err(|e| Rejection::from(e).with_price(price))?;
                true
            }
            // The best payment itself is cached; a re-signed copy of it is not.
            Ok(PaymentCheck::Repeat) => is_best,
            // An older payment of this channel (it raced a top-up): identification only.
            Err(PaymentError::NotAnIncrease { .. }) => {
                record
                    .channel
                    .verify_client_signature(&payment)
                    .map_err(|e| reject(RejectionKind::Payment(e), Some(&record)))?;
                false
            }
            Err(e) => return Err(reject(RejectionKind::Payment(e), Some(&record))),
        };
        if cache {
            self.remember(id, header);
        }
        self.debit(id, price, Some(record)).await
    }

    /// Caches `header` as the channel's verified best, in place of its previous best: at most
    /// one header per channel, so no client can crowd the others out.
    fn remember(&self, id: ChannelId, header: HeaderValue) {
        if self.verified.len() >= VERIFIED_CACHE_LIMIT {
            self.verified.clear();
            self.latest.clear();
        }
        if let Some(previous) = self.latest.insert(id, header.clone())
            && previous != header
        {
            self.verified.remove(&previous);
        }
        self.verified.insert(header, id);
    }

    /// Debits `price`; on refusal, reports the channel's current state.
    async fn debit(
        &self,
        id: ChannelId,
        price: MilliSats,
        record: Option<ChannelRecord>,
    ) -> Result<Paid, Rejection> {
        let kind = match self
            .store
            .debit(id, price)
            .await
            .map_err(|e| Rejection::from(e).with_price(price))?
        {
            Debit::Debited { balance } => return Ok(Paid { channel: id, price, balance }),
            Debit::Insufficient { .. } => RejectionKind::InsufficientBalance,
            Debit::NotOpen { state: ChannelState::Pending } => RejectionKind::ChannelPending,
            Debit::NotOpen { state } => RejectionKind::ChannelNotOpen(state),
        };
        let record =
            self.store.load(id).await.map_err(|e| Rejection::from(e).with_price(price))?.or(record);
        Err(Rejection::new(kind, record.map(|r| r.snapshot(price, self.bundle))).with_price(price))
    }
}
