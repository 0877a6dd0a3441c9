//! The money: identify the request's channel, store a better payment before anything is
//! served, debit the price atomically; the payment endpoint; the stream meter's debits.

use std::sync::Arc;

use http::{HeaderValue, Response};

use super::cache::VerifiedHeader;
use super::{BALANCE_HEADER, Meter};
use crate::MilliSats;
use crate::channel::{
    ChannelState, CheckedPayment, PaymentCheck, PaymentChecker, PaymentError, server_amount,
};
use crate::server::Paid;
use crate::server::rejection::{Rejection, RejectionKind};
use crate::server::stream::{BoxFuture, Target, Units};
use crate::store::ops::{Debit, DebitOnce, IdempotencyClaim, IdempotencyRecord, StorePayment};
use crate::store::{ChannelRecord, ChannelStore, StoreError};
use crate::wire::{self, ChannelId, PaymentAnswer, Problem, Receipt};

/// What [`Meter::charge`] did.
pub(super) enum Charged {
    /// Charged: the receipt, and what the payment the request carried pays.
    Paid(Paid, MilliSats),
    /// Nothing charged: the request's idempotency key is held by this record.
    Held(IdempotencyRecord),
}

impl<St: ChannelStore, P: Send + Sync + 'static> Meter<St, P> {
    /// The payment endpoint: stores a better payment of the channel (as a paid request would,
    /// but charging nothing) and answers the balance.
    pub(in crate::server) async fn accept_payment<B: From<String>>(
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
            Ok(Charged::Held(_)) => Rejection::new(RejectionKind::StoreUnavailable, None)
                .into_response(&self.config.terms_url),
            Err(rejection) => rejection.into_response(&self.config.terms_url),
        }
    }

    /// Identifies the channel, stores a better payment before anything is served, and debits
    /// the price atomically.
    pub(super) async fn charge(
        &self,
        header: Option<HeaderValue>,
        price: MilliSats,
        claim: Option<&IdempotencyClaim>,
    ) -> Result<Charged, Rejection> {
        let header = header.ok_or_else(|| {
            Rejection::new(RejectionKind::PaymentRequired, None).with_price(price)
        })?;
        let header = VerifiedHeader(header);
        let Some((id, carried)) = self.verified.get(&header) else {
            // Boxed, as every path but the fast one below: the future of every paid request
            // stays small (a few hundred bytes rather than a few kilobytes to copy).
            return Box::pin(self.charge_new(header.0, price, claim)).await;
        };
        if claim.is_some() {
            return Box::pin(self.debit(id, price, None, claim, carried)).await;
        }
        // The fast path: a verified header, one atomic debit.
        let debit = self.config.store.debit(id, price).await;
        if let Ok(Debit::Debited { balance }) = debit {
            return Ok(Charged::Paid(Paid { channel: id, price, balance, shadow: false }, carried));
        }
        Ok(Charged::Paid(Box::pin(self.debited(id, price, debit, None)).await?, carried))
    }

    /// [`charge`](Self::charge) for a header that is not a cached, verified payment: decodes
    /// and checks it, and stores it if it is a better payment. On a channel this node knows
    /// the terms of, that is one store operation; otherwise the channel is loaded first.
    async fn charge_new(
        &self,
        header: HeaderValue,
        price: MilliSats,
        claim: Option<&IdempotencyClaim>,
    ) -> Result<Charged, Rejection> {
        let reject = |kind, record: Option<&ChannelRecord>| {
            Rejection::new(kind, record.map(|r| r.snapshot(price, self.config.prepaid_top_up)))
                .with_price(price)
        };
        let (payment, encoded) = wire::decode_payment_encoded(header.as_bytes())
            .map_err(|e| reject(RejectionKind::Header(e), None))?;
        let outpoint =
            payment.input.first().map(|input| input.previous_output).ok_or_else(|| {
                reject(RejectionKind::Payment(PaymentError::InputCount { found: 0 }), None)
            })?;
        let id = ChannelId::new(outpoint);
        let carried = MilliSats::from_sat(server_amount(&payment)).unwrap_or(MilliSats::MAX);
        let tip = *self.config.tip.borrow();
        // Known terms: checked against them alone. Whether the payment pays more than the
        // best, and whether the channel is open, the store's `pay` decides atomically (it
        // stores only a better payment, debits only an open channel).
        if claim.is_none()
            && let Some((checker, cached)) = self.verified.terms(id)
        {
            match checker.check_payment(None, &payment, tip) {
                // Paying no more than the header cached for the channel (which the store
                // holds, or a better one): it identifies the channel, and storing it would
                // change nothing.
                Ok(_) if carried <= cached => {
                    return self.debit(id, price, None, None, carried).await;
                }
                Ok(_) => {
                    let payment = CheckedPayment::checked(payment, encoded);
                    return self.pay(id, &header, payment, price, carried, checker).await;
                }
                // Inside the close margin the channel's best itself is still served (a
                // repeat, which only the record can tell): decided as on a loaded channel.
                Err(PaymentError::Closing { .. }) => {}
                Err(e) => {
                    let kind = RejectionKind::Payment(e);
                    return Err(Box::pin(self.refuse_known(id, kind, price)).await);
                }
            }
        }
        let record = self
            .config
            .store
            .load(id)
            .await
            .map_err(|e| Rejection::from(e).with_price(price))?
            .ok_or_else(|| reject(RejectionKind::UnknownChannel, None))?;
        if let Some(signer) = &self.signer {
            signer.remember(&record);
        }
        if let Some(kind) = state_refusal(record.state) {
            return Err(reject(kind, Some(&record)));
        }
        let checker = Arc::new(PaymentChecker::new(record.channel.clone()));
        let is_best = record.best.as_ref() == Some(&payment);
        let cache = match checker.check_payment(record.best.as_ref(), &payment, tip) {
            // Stale means a concurrent request stored an even better payment: fine.
            Ok(PaymentCheck::Increase { .. }) if claim.is_none() => {
                let payment = CheckedPayment::checked(payment, encoded);
                return self.pay(id, &header, payment, price, carried, checker).await;
            }
            // With an idempotency key: the payment is stored first (it only ever grows the
            // channel), then the debit claims the key.
            // Cached only if the store holds it or a better one (not if the channel stopped
            // being open meanwhile).
            Ok(PaymentCheck::Increase { server_amount: paid, .. }) => {
                let stored = self
                    .config
                    .store
                    .store_payment(id, payment)
                    .await
                    .map_err(|e| Rejection::from(e).with_price(price))?;
                match stored {
                    StorePayment::Stored { .. } => true,
                    StorePayment::Stale { best } => best >= paid,
                }
            }
            // The best payment itself is cached; a re-signed copy of it is not.
            Ok(PaymentCheck::Repeat) => is_best,
            // An older payment of this channel (it raced a top-up): identification only.
            Err(PaymentError::NotAnIncrease { .. }) => {
                checker
                    .verify_client_signature(&payment)
                    .map_err(|e| reject(RejectionKind::Payment(e), Some(&record)))?;
                false
            }
            Err(e) => return Err(reject(RejectionKind::Payment(e), Some(&record))),
        };
        if cache {
            self.verified.remember(id, &header, carried, checker);
        }
        self.debit(id, price, Some(record), claim, carried).await
    }

    /// The refusal of a payment on a channel whose terms this node knows, as on a loaded
    /// channel: the channel's state first (a channel that is not open is refused for that),
    /// then `kind`, with the channel's state in the problem.
    async fn refuse_known(
        &self,
        id: ChannelId,
        kind: RejectionKind,
        price: MilliSats,
    ) -> Rejection {
        let record = match self.config.store.load(id).await {
            Ok(record) => record,
            Err(e) => return Rejection::from(e).with_price(price),
        };
        let kind = match &record {
            Some(record) => state_refusal(record.state).unwrap_or(kind),
            None => RejectionKind::UnknownChannel,
        };
        Rejection::new(kind, record.map(|r| r.snapshot(price, self.config.prepaid_top_up)))
            .with_price(price)
    }

    /// Stores `payment` (checked against channel `id`'s terms, `checker`) if it pays more,
    /// and debits `price`, in one store operation.
    async fn pay(
        &self,
        id: ChannelId,
        header: &HeaderValue,
        payment: CheckedPayment,
        price: MilliSats,
        carried: MilliSats,
        checker: Arc<PaymentChecker>,
    ) -> Result<Charged, Rejection> {
        let debit = self.config.store.pay(id, payment, price).await;
        // Cached only once the store holds it (or a better one): a header whose payment was
        // not stored must come through this check again, or it would never be.
        if matches!(debit, Ok(Debit::Debited { .. } | Debit::Insufficient { .. })) {
            self.verified.remember(id, header, carried, checker);
        }
        Ok(Charged::Paid(self.debited(id, price, debit, None).await?, carried))
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
            None => self.config.store.debit(id, price).await,
            Some(claim) => match self.config.store.debit_once(id, price, claim).await {
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
        let record = Box::pin(self.config.store.load(id))
            .await
            .map_err(|e| Rejection::from(e).with_price(price))?
            .or(record);
        Err(Rejection::new(kind, record.map(|r| r.snapshot(price, self.config.prepaid_top_up)))
            .with_price(price))
    }
}
impl<St: ChannelStore, P: Send + Sync + 'static> Units for Meter<St, P> {
    fn debit(
        &self,
        channel: ChannelId,
        amount: MilliSats,
    ) -> BoxFuture<'_, Result<MilliSats, Problem>> {
        Box::pin(async move {
            let debit = self.config.store.debit(channel, amount).await;
            match self.debited(channel, amount, debit, None).await {
                Ok(paid) => Ok(paid.balance),
                Err(rejection) => Err(rejection.problem(&self.config.terms_url)),
            }
        })
    }

    fn try_debit(&self, channel: ChannelId, amount: MilliSats) -> BoxFuture<'_, Option<MilliSats>> {
        Box::pin(async move {
            match self.config.store.debit(channel, amount).await {
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
            let record = self.config.store.load(channel).await.ok()??;
            let receipt = target.receipt(channel, charged, record.paid(), record.unspent());
            // The end of a metered stream: always signed.
            self.sign_now(receipt).await
        })
    }
}

/// Why a channel in `state` takes no payment and serves nothing: `None` when it is open.
fn state_refusal(state: ChannelState) -> Option<RejectionKind> {
    match state {
        ChannelState::Open => None,
        ChannelState::Pending => Some(RejectionKind::ChannelPending),
        state => Some(RejectionKind::ChannelNotOpen(state)),
    }
}
