//! The meter: charges a priced request and serves it. Cut by concern: `charge` the money
//! (identify the channel, store a better payment, debit), `cache` the fast path's verified
//! headers, `receipts` the receipts and their signer, `once` the idempotency keys.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderName, HeaderValue, Request, Response};
use http_body::Body as HttpBody;
use tokio::sync::watch;
use tower::BoxError;
use tower::Service;

use super::idempotency::Idempotency;
use super::rejection::Rejection;
use super::stream::{StreamMeter, Target};
use super::{ActualCost, Paid, ReceiptSigning, ShadowTally};
use crate::MilliSats;
use bitcoin::bip32::Xpriv;

use crate::channel::ChainTip;
use crate::store::ChannelStore;
use crate::store::ops::IdempotencyClaim;
use crate::wire::{
    PAYMENT_CHANNEL, PAYMENT_CHANNEL_BALANCE, PAYMENT_CHANNEL_STREAM, PAYMENT_RECEIPT,
    PAYMENT_RECEIPT_PREV, PAYMENT_RECEIPT_UNSIGNED, UnsignedReceipts,
};

/// The header names of the per-request path, parsed once (a `&str` name is parsed and checked
/// on every use).
const CHANNEL_HEADER: HeaderName = HeaderName::from_static(PAYMENT_CHANNEL);
const BALANCE_HEADER: HeaderName = HeaderName::from_static(PAYMENT_CHANNEL_BALANCE);
const RECEIPT_HEADER: HeaderName = HeaderName::from_static(PAYMENT_RECEIPT);
const RECEIPT_PREV_HEADER: HeaderName = HeaderName::from_static(PAYMENT_RECEIPT_PREV);
const RECEIPT_UNSIGNED_HEADER: HeaderName = HeaderName::from_static(PAYMENT_RECEIPT_UNSIGNED);

mod cache;
mod charge;
mod once;
mod receipts;

use cache::VerifiedHeaders;
use charge::Charged;
use receipts::{ReceiptValue, Signer};

/// A paywall's configuration: what [`PaywallLayer`](super::PaywallLayer)'s builder sets.
/// Copied on write by a layer configured after it was cloned; it holds no runtime state.
pub(in crate::server) struct MeterConfig<St, P> {
    pub(in crate::server) store: Arc<St>,
    pub(in crate::server) pricing: P,
    pub(in crate::server) tip: watch::Receiver<ChainTip>,
    pub(in crate::server) prepaid_top_up: MilliSats,
    pub(in crate::server) credit_server_errors: bool,
    pub(in crate::server) terms_url: String,
    /// Whether the inner service sees the `Payment-Channel` header.
    pub(in crate::server) forward_payment_header: bool,
    /// Shadow mode: price, count and serve without asking for payment. (The tally is a
    /// handle the operator reads from the layer, shared by its services.)
    pub(in crate::server) shadow: Option<Arc<ShadowTally>>,
    /// The master key receipts are signed with (each channel's K2 derives from it), if the
    /// layer gives receipts.
    pub(in crate::server) receipts: Option<Xpriv>,
    /// Receipts turned off: negotiation endpoints do not turn them on.
    pub(in crate::server) no_receipts: bool,
    /// When receipts are signed.
    pub(in crate::server) receipt_signing: ReceiptSigning,
    /// How the responses of requests with an `Idempotency-Key` are kept (`None`: the header
    /// is ignored).
    pub(in crate::server) idempotency: Option<Idempotency>,
    /// How long a [`StreamMeter`] waits for a top-up.
    pub(in crate::server) stream_hold: Duration,
    /// Where clients hand over a better payment without a request to pay for (`POST`, the
    /// payment in `Payment-Channel`): under the negotiation endpoints' prefix.
    pub(in crate::server) payment_path: Option<String>,
}

impl<St, P: Clone> Clone for MeterConfig<St, P> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            pricing: self.pricing.clone(),
            tip: self.tip.clone(),
            prepaid_top_up: self.prepaid_top_up,
            credit_server_errors: self.credit_server_errors,
            terms_url: self.terms_url.clone(),
            forward_payment_header: self.forward_payment_header,
            shadow: self.shadow.clone(),
            receipts: self.receipts,
            no_receipts: self.no_receipts,
            receipt_signing: self.receipt_signing,
            idempotency: self.idempotency,
            stream_hold: self.stream_hold,
            payment_path: self.payment_path.clone(),
        }
    }
}

/// The meter behind [`Paywall`](super::Paywall): prices a request, identifies its channel,
/// stores a better payment and debits the price in one atomic store operation, and credits
/// back what the inner service did not use. Built once per layer configuration, when the
/// layer makes its first service, and shared by every service it makes: the configuration
/// and the runtime state its services share (the fast path's cache, the receipts' keys and
/// batches).
pub(in crate::server) struct Meter<St, P> {
    pub(in crate::server) config: Arc<MeterConfig<St, P>>,
    /// The fast path's cache of verified payment headers.
    verified: VerifiedHeaders,
    /// Signs a [`Receipt`](crate::wire::Receipt) for paid responses, with each channel's K2.
    signer: Option<Signer>,
}

impl<St, P> Meter<St, P> {
    /// The runtime of `config`: empty caches.
    pub(in crate::server) fn new(config: Arc<MeterConfig<St, P>>) -> Self {
        let signer = config.receipts.map(|master| Signer::new(master, config.receipt_signing));
        Self { config, verified: VerifiedHeaders::default(), signer }
    }
}

impl<St: ChannelStore, P: Send + Sync + 'static> Meter<St, P> {
    /// Charges `price` for `request`, runs `inner` on it if paid, and credits back what a
    /// 5xx or a handler's [`ActualCost`] gives back.
    ///
    /// Not an `async fn`: one's `mut` parameters are copied into its future twice, and the
    /// future of every paid request is moved into a box; the block mutates the captures.
    #[allow(clippy::manual_async_fn, reason = "an async fn's future is larger (see above)")]
    pub(super) fn serve<S, ReqBody, ResBody>(
        self: Arc<Self>,
        mut inner: S,
        mut request: Request<ReqBody>,
        price: MilliSats,
    ) -> impl Future<Output = Result<Response<ResBody>, S::Error>>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        ResBody: HttpBody<Data = Bytes> + From<String> + From<Bytes>,
        ResBody::Error: Into<BoxError>,
    {
        async move {
            // Out of the request, which (its body need not be `Sync`) is not borrowed across an
            // await.
            let header = self.payment_header(&mut request);
            let (claim, target) = match self.claim_and_target(&request) {
                Ok(parts) => parts,
                Err(refused) => return Ok(refused),
            };
            let (paid, carried) = match self.charge(header, price, claim.as_deref()).await {
                Ok(Charged::Paid(paid, carried)) => (paid, carried),
                Ok(Charged::Held(record)) => return Ok(self.held(&record, claim.as_deref())),
                Err(rejection) => return Ok(rejection.into_response(&self.config.terms_url)),
            };
            let mut unfinished = self.unfinished(claim.as_deref(), paid.channel);
            let hold = self.config.stream_hold;
            let stream = StreamMeter::new(self.clone(), paid.channel, hold, target, price);
            request.extensions_mut().insert(paid);
            request.extensions_mut().insert(stream.clone());
            let mut response = inner.call(request).await?;
            let give_back = self.give_back(&response, price);
            let (balance, charged) = self.account(give_back, &stream, paid, price).await;
            let headers = response.headers_mut();
            headers.insert(BALANCE_HEADER, HeaderValue::from(balance.to_msat()));
            if let Some(unit) = stream.stream_header() {
                headers.insert(PAYMENT_CHANNEL_STREAM, unit);
            }
            if let Some(target) = stream.target() {
                let value =
                    match self.receipt_header(target, paid.channel, charged, carried, balance) {
                        Some(ReceiptValue::Unsigned(value)) => Some(value),
                        Some(ReceiptValue::Due(receipt)) => {
                            Box::pin(self.signed_header(receipt)).await
                        }
                        None => None,
                    };
                if let Some(value) = value {
                    headers.insert(RECEIPT_HEADER, value);
                }
            }
            match claim {
                Some(claim) => {
                    let streamed = stream.stream_header().is_some();
                    let kept =
                        Box::pin(self.keep(paid.channel, &claim, response, charged, streamed))
                            .await;
                    if let Some(unfinished) = &mut unfinished {
                        unfinished.claim = None;
                    }
                    Ok(kept)
                }
                None => Ok(response),
            }
        }
    }

    /// What a served request was charged in the end and the balance after it: its price and
    /// what the handler charged through the stream meter before answering, less `give_back`
    /// (credited back).
    async fn account(
        &self,
        give_back: MilliSats,
        stream: &StreamMeter,
        paid: Paid,
        price: MilliSats,
    ) -> (MilliSats, MilliSats) {
        let extra = stream.charged().saturating_sub(price);
        let (mut balance, mut charged) = (paid.balance, price.saturating_add(extra));
        if give_back > MilliSats::ZERO {
            // If the store fails here the client stays charged for this request; the
            // channel's money is safe either way.
            // Rare paths are boxed (here and below): the future of every paid request stays
            // small, which the fast path pays for in copies.
            if let Ok(after) = Box::pin(self.config.store.credit(paid.channel, give_back)).await {
                balance = after;
                charged = charged.saturating_sub(give_back);
            }
        } else if extra > MilliSats::ZERO
            && let Ok(Some(record)) = Box::pin(self.config.store.load(paid.channel)).await
        {
            balance = record.unspent();
        }
        (balance, charged)
    }

    /// The request's idempotency claim (refused: the problem's response) and the target of
    /// its receipt (when the layer gives receipts), from the path the client sent (axum's
    /// `nest` strips its prefix from the URI the layer sees and keeps the original). Behind
    /// a pointer (the claim) or in the request's stream meter (the target), so the future of
    /// every paid request stays small.
    #[allow(clippy::type_complexity, reason = "the two parts and the refusal, once")]
    fn claim_and_target<B, ResBody: From<String>>(
        &self,
        request: &Request<B>,
    ) -> Result<(Option<Box<IdempotencyClaim>>, Option<Target>), Response<ResBody>> {
        let uri = request
            .extensions()
            .get::<axum::extract::OriginalUri>()
            .map_or(request.uri(), |original| &original.0);
        let path = uri.path_and_query();
        let claim = match self
            .config
            .idempotency
            .as_ref()
            .map(|keep| keep.claim(request, path.map_or("/", |p| p.as_str())))
        {
            Some(Err(kind)) => {
                return Err(Rejection::new(kind, None).into_response(&self.config.terms_url));
            }
            Some(Ok(claim)) => claim.map(Box::new),
            None => None,
        };
        let headers = request.headers();
        let target = self.signer.is_some().then(|| Target {
            method: request.method().clone(),
            path: path.cloned().unwrap_or_else(|| PathAndQuery::from_static("/")),
            prev: headers.get(RECEIPT_PREV_HEADER).cloned(),
            // A malformed one asks for every receipt signed.
            unsigned: headers
                .get(RECEIPT_UNSIGNED_HEADER)
                .and_then(|value| UnsignedReceipts::parse(value.as_bytes())),
        });
        Ok((claim, target))
    }

    /// What the answer gives back of `price`: all of it for a server error (when configured),
    /// else what the handler's [`ActualCost`] did not use.
    fn give_back<ResBody>(&self, response: &Response<ResBody>, price: MilliSats) -> MilliSats {
        if self.config.credit_server_errors && response.status().is_server_error() {
            return price;
        }
        let cost = response.extensions().get::<ActualCost>();
        cost.map_or(MilliSats::ZERO, |ActualCost(cost)| price.saturating_sub(*cost))
    }

    /// The request's `Payment-Channel` header. A bearer proof of the channel: unless told to
    /// forward it, the inner service (a proxy, a logger) has no business with it, paid or
    /// free, so it is taken out of the request rather than copied.
    pub(super) fn payment_header<B>(&self, request: &mut Request<B>) -> Option<HeaderValue> {
        if self.config.forward_payment_header {
            request.headers().get(CHANNEL_HEADER).cloned()
        } else {
            request.headers_mut().remove(CHANNEL_HEADER)
        }
    }
}
