//! The meter: charge, debit, credit.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response};
use http_body::Body as HttpBody;
use http_body_util::BodyExt;
use tokio::sync::watch;
use tower::BoxError;
use tower::Service;

use super::idempotency::{self, Idempotency};
use super::rejection::{Rejection, RejectionKind};
use super::stream::{BoxFuture, StreamMeter, Target, Units};
use super::{ActualCost, Paid, ReceiptSigning, ShadowTally};
use crate::MilliSats;
use bitcoin::bip32::Xpriv;
use bitcoin::hex::FromHex;
use bitcoin::secp256k1::SecretKey;

use crate::channel::{
    ChainTip, CheckedPayment, PaymentCheck, PaymentError, channel_key, server_amount,
};
use crate::store::{
    ChannelRecord, ChannelState, ChannelStore, Debit, DebitOnce, IdempotencyClaim,
    IdempotencyRecord, StoreError,
};
use crate::wire::{
    self, ChannelId, PAYMENT_CHANNEL, PAYMENT_CHANNEL_BALANCE, PAYMENT_CHANNEL_STREAM,
    PAYMENT_RECEIPT, PAYMENT_RECEIPT_PREV, PAYMENT_RECEIPT_UNSIGNED, PaymentAnswer, Problem,
    Receipt, UnsignedReceipts,
};

/// The header names of the per-request path, parsed once (a `&str` name is parsed and checked
/// on every use).
const CHANNEL_HEADER: HeaderName = HeaderName::from_static(PAYMENT_CHANNEL);
const BALANCE_HEADER: HeaderName = HeaderName::from_static(PAYMENT_CHANNEL_BALANCE);

/// A verified `Payment-Channel` header value, as the fast-path cache's key. Equal when the
/// whole values are equal; hashed over the value's length and its last [`Self::HASHED`] bytes
/// only: the base64 of a payment ends with the client's signature (its last ~32 bytes, which
/// depend on the payment's sighash) and the lock time, so no two payments share them.
/// Hashing all of a 250-byte header was a tenth of the layer's own cost per request. Keys that
/// agree on the hashed bytes would merely share a bucket (the hasher is keyed; entries are
/// only ever verified payments, at most one per channel).
#[derive(PartialEq, Eq, Clone)]
pub(super) struct VerifiedHeader(HeaderValue);

impl VerifiedHeader {
    const HASHED: usize = 48;
}

impl std::hash::Hash for VerifiedHeader {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let bytes = self.0.as_bytes();
        state.write_usize(bytes.len());
        state.write(&bytes[bytes.len().saturating_sub(Self::HASHED)..]);
    }
}

/// The meter behind [`Paywall`](super::Paywall): prices a request, identifies its channel,
/// stores a better payment and debits the price in one atomic store operation, and credits
/// back what the inner service did not use. It owns the store, the chain tip and the
/// fast-path cache of verified payment headers.
pub(super) struct Meter<St, P> {
    pub(super) store: Arc<St>,
    pub(super) pricing: P,
    pub(super) tip: watch::Receiver<ChainTip>,
    pub(super) bundle: MilliSats,
    pub(super) refund_server_errors: bool,
    pub(super) terms_url: String,
    /// Header values already verified as payments of a channel, with what they pay the
    /// server. A verified payment stays a valid proof of its channel forever, so a hit skips
    /// decoding and verification; the atomic debit still enforces the balance and the
    /// channel's state.
    pub(super) verified: dashmap::DashMap<VerifiedHeader, (ChannelId, MilliSats)>,
    /// The header cached for each channel (one per channel: a new best replaces the old).
    pub(super) latest: dashmap::DashMap<crate::wire::ChannelId, VerifiedHeader>,
    /// Whether the inner service sees the `Payment-Channel` header.
    pub(super) forward_payment_header: bool,
    /// Shadow mode: price, count and serve without asking for payment.
    pub(super) shadow: Option<Arc<ShadowTally>>,
    /// Signs a [`Receipt`] for every paid response, with each channel's K2.
    pub(super) signer: Option<Arc<Signer>>,
    /// Receipts turned off: negotiation endpoints do not turn them on.
    pub(super) no_receipts: bool,
    /// When receipts are signed.
    pub(super) receipt_signing: ReceiptSigning,
    /// How the responses of requests with an `Idempotency-Key` are kept (`None`: the header
    /// is ignored).
    pub(super) idempotency: Option<Idempotency>,
    /// How long a [`StreamMeter`] waits for a top-up.
    pub(super) stream_hold: Duration,
    /// Where clients hand over a better payment without a request to pay for (`POST`, the
    /// payment in `Payment-Channel`): under the negotiation endpoints' prefix.
    pub(super) payment_path: Option<String>,
}

/// A claimed idempotency key whose request has not been finished yet; dropped unfinished,
/// it marks the key served but not kept (in the background).
struct Unfinished<St: ChannelStore> {
    store: Arc<St>,
    channel: ChannelId,
    claim: Option<IdempotencyClaim>,
    until: u64,
}

impl<St: ChannelStore> Drop for Unfinished<St> {
    fn drop(&mut self) {
        let Some(claim) = self.claim.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (store, channel, until) = (Arc::clone(&self.store), self.channel, self.until);
        runtime.spawn(async move {
            let unkept = Some(idempotency::unavailable());
            if let Err(error) = store.finish_once(channel, &claim, unkept, until).await {
                tracing::warn!(%error, "an abandoned idempotency key could not be finished");
            }
        });
    }
}

/// What [`Meter::charge`] did.
pub(super) enum Charged {
    /// Charged: the receipt, and what the payment the request carried pays.
    Paid(Paid, MilliSats),
    /// Nothing charged: the request's idempotency key is held by this record.
    Held(IdempotencyRecord),
}

/// The receipts' signer: the master key, each channel's server key once derived, and when
/// to sign.
pub(super) struct Signer {
    master: Xpriv,
    keys: dashmap::DashMap<ChannelId, SecretKey>,
    signing: ReceiptSigning,
    /// Per channel: the receipts this node left unsigned since it last signed one, and when.
    batches: dashmap::DashMap<ChannelId, (u32, std::time::Instant)>,
}

impl Signer {
    pub(super) fn new(master: Xpriv, signing: ReceiptSigning) -> Self {
        let (keys, batches) = (dashmap::DashMap::new(), dashmap::DashMap::new());
        Self { master, keys, signing, batches }
    }

    /// Whether the receipt of `channel` for a client that said `unsigned` is signed (see
    /// [`ReceiptSigning::Batched`]); counts it either way.
    fn due(&self, channel: ChannelId, unsigned: Option<UnsignedReceipts>) -> bool {
        let (ReceiptSigning::Batched { every, within }, Some(said)) = (self.signing, unsigned)
        else {
            return true;
        };
        let now = std::time::Instant::now();
        if self.batches.len() >= VERIFIED_CACHE_LIMIT && !self.batches.contains_key(&channel) {
            self.batches.clear();
        }
        let mut batch = self.batches.entry(channel).or_insert((u32::MAX, now));
        let (left, since) = *batch;
        let due = left == u32::MAX // this node's first receipt of the channel
            || said.must_sign(every)
            || left.saturating_add(1) >= every
            || now.duration_since(since) >= within;
        *batch = if due { (0, now) } else { (left + 1, since) };
        due
    }

    pub(super) fn master(&self) -> Xpriv {
        self.master
    }

    /// Derives and keeps the server key of `record`'s channel.
    fn remember(&self, record: &ChannelRecord) {
        if !self.keys.contains_key(&record.id())
            && let Ok(key) = channel_key(&self.master, record.key_index)
        {
            if self.keys.len() >= VERIFIED_CACHE_LIMIT {
                self.keys.clear();
            }
            self.keys.insert(record.id(), key);
        }
    }
}

impl<St, P: Clone> Clone for Meter<St, P> {
    /// A copy of the configuration with empty caches (see
    /// [`PaywallLayer::config_mut`](super::PaywallLayer)).
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            pricing: self.pricing.clone(),
            tip: self.tip.clone(),
            bundle: self.bundle,
            refund_server_errors: self.refund_server_errors,
            terms_url: self.terms_url.clone(),
            verified: dashmap::DashMap::new(),
            latest: dashmap::DashMap::new(),
            forward_payment_header: self.forward_payment_header,
            shadow: self.shadow.clone(),
            signer: self
                .signer
                .as_ref()
                .map(|signer| Arc::new(Signer::new(signer.master, signer.signing))),
            receipt_signing: self.receipt_signing,
            no_receipts: self.no_receipts,
            idempotency: self.idempotency,
            stream_hold: self.stream_hold,
            payment_path: self.payment_path.clone(),
        }
    }
}

/// How many verified headers (one per channel) the fast-path cache keeps before it starts
/// over.
pub(super) const VERIFIED_CACHE_LIMIT: usize = 100_000;

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
                Err(rejection) => return Ok(rejection.into_response(&self.terms_url)),
            };
            // A claim whose request is dropped (the client went away) or fails before it is
            // finished is marked served but not kept: its retry is refused, never charged again.
            let mut unfinished =
                claim.as_ref().zip(self.idempotency.as_ref()).map(|(claim, keep)| {
                    Box::new(Unfinished {
                        store: Arc::clone(&self.store),
                        channel: paid.channel,
                        claim: Some((**claim).clone()),
                        until: keep.keep_until(),
                    })
                });
            let stream = StreamMeter::new(
                self.clone(),
                paid.channel,
                self.stream_hold,
                target.as_deref().cloned(),
                price,
            );
            request.extensions_mut().insert(paid);
            request.extensions_mut().insert(stream.clone());
            let mut response = inner.call(request).await?;
            let give_back = self.give_back(&response, price);
            // Units the handler charged through the stream meter before answering count too.
            let extra = stream.charged().saturating_sub(price);
            let (mut balance, mut charged) = (paid.balance, price.saturating_add(extra));
            if give_back > MilliSats::ZERO {
                // If the store fails here the client stays charged for this request; the
                // channel's money is safe either way.
                // Rare paths are boxed (here and below): the future of every paid request stays
                // small, which the fast path pays for in copies.
                if let Ok(after) = Box::pin(self.store.credit(paid.channel, give_back)).await {
                    balance = after;
                    charged = charged.saturating_sub(give_back);
                }
            } else if extra > MilliSats::ZERO
                && let Ok(Some(record)) = Box::pin(self.store.load(paid.channel)).await
            {
                balance = record.unspent();
            }
            let headers = response.headers_mut();
            headers.insert(BALANCE_HEADER, HeaderValue::from(balance.to_msat()));
            if let Some(unit) = stream.stream_header() {
                headers.insert(PAYMENT_CHANNEL_STREAM, unit);
            }
            if let Some(target) = target
                && let Some(value) =
                    self.receipt_header(&target, paid.channel, charged, carried, balance).await
            {
                headers.insert(PAYMENT_RECEIPT, value);
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

    /// The request's idempotency claim (refused: the problem's response) and the target of
    /// its receipt (when the layer gives receipts), from the path the client sent (axum's
    /// `nest` strips its prefix from the URI the layer sees and keeps the original). Boxed:
    /// they are rare, and the future of every paid request stays small.
    #[allow(clippy::type_complexity, reason = "the two parts and the refusal, once")]
    fn claim_and_target<B, ResBody: From<String>>(
        &self,
        request: &Request<B>,
    ) -> Result<(Option<Box<IdempotencyClaim>>, Option<Box<Target>>), Response<ResBody>> {
        let uri = request
            .extensions()
            .get::<axum::extract::OriginalUri>()
            .map_or(request.uri(), |original| &original.0);
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let claim = match self.idempotency.as_ref().map(|keep| keep.claim(request, path)) {
            Some(Err(kind)) => {
                return Err(Rejection::new(kind, None).into_response(&self.terms_url));
            }
            Some(Ok(claim)) => claim.map(Box::new),
            None => None,
        };
        let headers = request.headers();
        let target = self.signer.is_some().then(|| {
            Box::new(Target {
                method: request.method().clone(),
                path: path.to_owned(),
                // A malformed link is no link: the client sees the receipt unlinked.
                prev: headers
                    .get(PAYMENT_RECEIPT_PREV)
                    .and_then(|value| Vec::<u8>::from_hex(value.to_str().ok()?).ok())
                    .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok()),
                // A malformed one asks for every receipt signed.
                unsigned: headers
                    .get(PAYMENT_RECEIPT_UNSIGNED)
                    .and_then(|value| UnsignedReceipts::parse(value.as_bytes())),
            })
        });
        Ok((claim, target))
    }

    /// What the answer gives back of `price`: all of it for a server error (when configured),
    /// else what the handler's [`ActualCost`] did not use.
    fn give_back<ResBody>(&self, response: &Response<ResBody>, price: MilliSats) -> MilliSats {
        if self.refund_server_errors && response.status().is_server_error() {
            return price;
        }
        let cost = response.extensions().get::<ActualCost>();
        cost.map_or(MilliSats::ZERO, |ActualCost(cost)| price.saturating_sub(*cost))
    }

    /// The `Payment-Receipt` value of a request on `channel` to `target`, charged `charged`,
    /// carrying a payment of `carried`, `balance` left: signed when due (most receipts in a
    /// batch go unsigned, with no signing future to box).
    async fn receipt_header(
        &self,
        target: &Target,
        channel: ChannelId,
        charged: MilliSats,
        carried: MilliSats,
        balance: MilliSats,
    ) -> Option<HeaderValue> {
        let signer = self.signer.as_ref()?;
        if !signer.due(channel, target.unsigned) {
            // The compact form: the client completes it from its request (`Receipt::decode_for`).
            return HeaderValue::try_from(Receipt::encode_unsigned(charged, balance)).ok();
        }
        let receipt = target.receipt(channel, charged, carried, balance);
        let receipt = Box::pin(self.sign_now(receipt)).await?;
        HeaderValue::try_from(receipt.encode()).ok()
    }

    /// The request's `Payment-Channel` header. A bearer proof of the channel: unless told to
    /// forward it, the inner service (a proxy, a logger) has no business with it, paid or
    /// free, so it is taken out of the request rather than copied.
    pub(super) fn payment_header<B>(&self, request: &mut Request<B>) -> Option<HeaderValue> {
        if self.forward_payment_header {
            request.headers().get(CHANNEL_HEADER).cloned()
        } else {
            request.headers_mut().remove(CHANNEL_HEADER)
        }
    }

    /// The answer to a request whose idempotency key is held: the kept response, or why not.
    fn held<B: From<String> + From<Bytes>>(
        &self,
        record: &IdempotencyRecord,
        claim: Option<&IdempotencyClaim>,
    ) -> Response<B> {
        let kind = match (claim, &record.response) {
            (Some(claim), _) if claim.fingerprint != record.fingerprint => {
                RejectionKind::IdempotencyKeyReused
            }
            (_, None) => RejectionKind::IdempotencyKeyInProgress,
            (_, Some(stored)) => match idempotency::replay(stored) {
                Ok(response) => return response,
                Err(kind) => kind,
            },
        };
        Rejection::new(kind, None).into_response(&self.terms_url)
    }

    /// Finishes `claim` with `response`: kept for replay when it was charged for and fits;
    /// marked as served but not kept when it does not; released when nothing was charged.
    async fn keep<B>(
        &self,
        channel: ChannelId,
        claim: &IdempotencyClaim,
        response: Response<B>,
        charged: MilliSats,
        streamed: bool,
    ) -> Response<B>
    where
        B: HttpBody<Data = Bytes> + From<Bytes> + From<String>,
        B::Error: Into<BoxError>,
    {
        let Some(keep) = &self.idempotency else { return response };
        let finish = async |stored: Option<Vec<u8>>| {
            let finished = self.store.finish_once(channel, claim, stored, keep.keep_until()).await;
            if let Err(error) = finished {
                // The claim lapses by itself; until then a retry is told to wait.
                tracing::warn!(%error, "an idempotency key could not be finished");
            }
        };
        // A 5xx whose charge was given back releases its key: the retry runs (and pays)
        // again. Any other answer is kept, even a free one: the handler ran.
        if charged == MilliSats::ZERO && response.status().is_server_error() {
            finish(None).await;
            return response;
        }
        let size = response.body().size_hint().exact();
        let fits = !streamed && size.is_some_and(|len| len <= keep.max_response_len() as u64);
        if !fits {
            finish(Some(idempotency::unavailable())).await;
            return response;
        }
        let (parts, body) = response.into_parts();
        // The body error (which need not be `Send`) is dropped before anything is awaited.
        let collected = body.collect().await.map(|collected| collected.to_bytes()).ok();
        match collected {
            Some(bytes) => {
                finish(Some(idempotency::encode(&parts, &bytes))).await;
                Response::from_parts(parts, B::from(bytes))
            }
            None => {
                // The response failed after it was charged: give the charge back.
                let _ = self.store.credit(channel, charged).await;
                finish(None).await;
                let mut failed = Response::new(B::from("the response failed".to_owned()));
                *failed.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
                failed
            }
        }
    }

    /// The payment endpoint: stores a better payment of the channel (as a paid request would,
    /// but charging nothing) and answers the balance.
    pub(super) async fn accept_payment<B: From<String>>(
        self: Arc<Self>,
        header: Option<HeaderValue>,
    ) -> Response<B> {
        match self.charge(header, MilliSats::ZERO, None).await {
            Ok(Charged::Paid(paid, carried)) => {
                let answer = PaymentAnswer {
                    channel: paid.channel,
                    paid_msat: carried,
                    balance_msat: paid.balance,
                };
                let mut response =
                    Response::new(B::from(serde_json::to_string(&answer).unwrap_or_default()));
                let headers = response.headers_mut();
                headers.insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                headers.insert(BALANCE_HEADER, HeaderValue::from(paid.balance.to_msat()));
                response
            }
            // Without a claim, nothing is ever held.
            Ok(Charged::Held(_)) => {
                Rejection::new(RejectionKind::StoreUnavailable, None).into_response(&self.terms_url)
            }
            Err(rejection) => rejection.into_response(&self.terms_url),
        }
    }

    /// Signs `receipt` with its channel's K2 (derived once per channel; a channel this node
    /// has not loaded yet is loaded for its key index).
    async fn sign_now(&self, receipt: Receipt) -> Option<Receipt> {
        let signer = self.signer.as_ref()?;
        if !signer.keys.contains_key(&receipt.channel) {
            let record = self.store.load(receipt.channel).await.ok()??;
            signer.remember(&record);
        }
        let key = *signer.keys.get(&receipt.channel)?;
        Some(receipt.sign(&key))
    }

    /// Identifies the channel, stores a better payment before anything is served, and debits
    /// the price atomically.
    async fn charge(
        &self,
        header: Option<HeaderValue>,
        price: MilliSats,
        claim: Option<&IdempotencyClaim>,
    ) -> Result<Charged, Rejection> {
        let header = header.ok_or_else(|| {
            Rejection::new(RejectionKind::PaymentRequired, None).with_price(price)
        })?;
        let header = VerifiedHeader(header);
        let Some((id, carried)) = self.verified.get(&header).map(|entry| *entry) else {
            // Boxed, as every path but the fast one below: the future of every paid request
            // stays small (a few hundred bytes rather than a few kilobytes to copy).
            return Box::pin(self.charge_new(header.0, price, claim)).await;
        };
        if claim.is_some() {
            return Box::pin(self.debit(id, price, None, claim, carried)).await;
        }
        // The fast path: a verified header, one atomic debit.
        let debit = self.store.debit(id, price).await;
        if let Ok(Debit::Debited { balance }) = debit {
            return Ok(Charged::Paid(Paid { channel: id, price, balance, shadow: false }, carried));
        }
        Ok(Charged::Paid(Box::pin(self.debited(id, price, debit, None)).await?, carried))
    }

    /// [`charge`](Self::charge) for a header that is not a cached, verified payment: decodes
    /// and checks it, and stores it if it is a better payment.
    async fn charge_new(
        &self,
        header: HeaderValue,
        price: MilliSats,
        claim: Option<&IdempotencyClaim>,
    ) -> Result<Charged, Rejection> {
        let reject = |kind, record: Option<&ChannelRecord>| {
            Rejection::new(kind, record.map(|r| r.snapshot(price, self.bundle))).with_price(price)
        };
        let payment = wire::decode_payment(header.as_bytes())
            .map_err(|e| reject(RejectionKind::Header(e), None))?;
        let outpoint =
            payment.input.first().map(|input| input.previous_output).ok_or_else(|| {
                reject(RejectionKind::Payment(PaymentError::InputCount { found: 0 }), None)
            })?;
        let id = ChannelId::new(outpoint);
        let carried = MilliSats::from_sat(server_amount(&payment)).unwrap_or(MilliSats::MAX);
        let record = self
            .store
            .load(id)
            .await
            .map_err(|e| Rejection::from(e).with_price(price))?
            .ok_or_else(|| reject(RejectionKind::UnknownChannel, None))?;
        if let Some(signer) = &self.signer {
            signer.remember(&record);
        }
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
            // Stored and debited in one store operation.
            // Cached only once the store holds it (or a better one): a header whose payment
            // was not stored must come through this check again, or it would never be.
            Ok(PaymentCheck::Increase { .. }) if claim.is_none() => {
                let payment = CheckedPayment::checked(payment);
                let debit = self.store.pay(id, payment, price).await;
                if matches!(debit, Ok(Debit::Debited { .. } | Debit::Insufficient { .. })) {
                    self.remember(id, header, carried);
                }
                let paid = self.debited(id, price, debit, Some(record)).await?;
                return Ok(Charged::Paid(paid, carried));
            }
            // With an idempotency key: the payment is stored first (it only ever grows the
            // channel), then the debit claims the key.
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
            self.remember(id, header, carried);
        }
        self.debit(id, price, Some(record), claim, carried).await
    }

    /// Caches `header` as the channel's verified best, in place of its previous best: at most
    /// one header per channel, so no client can crowd the others out.
    fn remember(&self, id: ChannelId, header: HeaderValue, carried: MilliSats) {
        let header = VerifiedHeader(header);
        if self.verified.len() >= VERIFIED_CACHE_LIMIT {
            self.verified.clear();
            self.latest.clear();
        }
        if let Some(previous) = self.latest.insert(id, header.clone())
            && previous != header
        {
            self.verified.remove(&previous);
        }
        self.verified.insert(header, (id, carried));
    }

    /// Debits `price` (claiming `claim`'s key with it); on refusal, reports the channel's
    /// current state.
    async fn debit(
        &self,
        id: ChannelId,
        price: MilliSats,
        record: Option<ChannelRecord>,
        claim: Option<&IdempotencyClaim>,
        carried: MilliSats,
    ) -> Result<Charged, Rejection> {
        let debit = match claim {
            None => self.store.debit(id, price).await,
            Some(claim) => match self.store.debit_once(id, price, claim).await {
                Ok(DebitOnce::Claimed(held)) => return Ok(Charged::Held(held)),
                Ok(DebitOnce::Debit(debit)) => Ok(debit),
                Err(e) => Err(e),
            },
        };
        Ok(Charged::Paid(self.debited(id, price, debit, record).await?, carried))
    }

    /// The outcome of a debit of `price`: the receipt, or a refusal with the channel's state.
    async fn debited(
        &self,
        id: ChannelId,
        price: MilliSats,
        debit: Result<Debit, StoreError>,
        record: Option<ChannelRecord>,
    ) -> Result<Paid, Rejection> {
        let kind = match debit.map_err(|e| Rejection::from(e).with_price(price))? {
            Debit::Debited { balance } => {
                return Ok(Paid { channel: id, price, balance, shadow: false });
            }
            Debit::Insufficient { .. } => RejectionKind::InsufficientBalance,
            Debit::NotOpen { state: ChannelState::Pending } => RejectionKind::ChannelPending,
            Debit::NotOpen { state } => RejectionKind::ChannelNotOpen(state),
        };
        let record = Box::pin(self.store.load(id))
            .await
            .map_err(|e| Rejection::from(e).with_price(price))?
            .or(record);
        Err(Rejection::new(kind, record.map(|r| r.snapshot(price, self.bundle))).with_price(price))
    }
}

impl<St: ChannelStore, P: Send + Sync + 'static> Units for Meter<St, P> {
    fn debit(
        &self,
        channel: ChannelId,
        amount: MilliSats,
    ) -> BoxFuture<'_, Result<MilliSats, Problem>> {
        Box::pin(async move {
            let debit = self.store.debit(channel, amount).await;
            match self.debited(channel, amount, debit, None).await {
                Ok(paid) => Ok(paid.balance),
                Err(rejection) => Err(rejection.problem(&self.terms_url)),
            }
        })
    }

    fn try_debit(&self, channel: ChannelId, amount: MilliSats) -> BoxFuture<'_, Option<MilliSats>> {
        Box::pin(async move {
            match self.store.debit(channel, amount).await {
                Ok(Debit::Debited { balance }) => Some(balance),
                _ => None,
            }
        })
    }

    fn receipt(
        &self,
        channel: ChannelId,
        target: &Target,
        charged: MilliSats,
    ) -> BoxFuture<'_, Option<Receipt>> {
        let target = target.clone();
        Box::pin(async move {
            let record = self.store.load(channel).await.ok()??;
            let receipt = target.receipt(channel, charged, record.paid(), record.unspent());
            // The end of a metered stream: always signed.
            self.sign_now(receipt).await
        })
    }
}
