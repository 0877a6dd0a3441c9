use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::BoxError;
use axum::body::{Bytes, HttpBody};
use http::{Request, Response};
use http_body_util::BodyExt;
use tower::{Service, ServiceExt};

use super::future::ResponseFuture;
use super::layer::Endpoints;
use super::meter::Meter;
use super::rejection::{Rejection, RejectionKind};
use super::{Paid, PaywallLayer, Priced, Pricing};
use crate::MilliSats;
use crate::store::ChannelStore;

/// Middleware that charges every priced request to a payment channel. See the
/// [module docs](super) for the request flow.
pub struct Paywall<S, St, P> {
    inner: S,
    meter: Arc<Meter<St, P>>,
    negotiation: Option<Arc<Endpoints<St>>>,
}

impl<S, St, P> Paywall<S, St, P> {
    /// Wraps `inner` with the configuration of `layer`.
    pub fn new(inner: S, layer: &PaywallLayer<St, P>) -> Self {
        Self { inner, meter: layer.meter(), negotiation: layer.endpoints() }
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
        Self {
            inner: self.inner.clone(),
            meter: self.meter.clone(),
            negotiation: self.negotiation.clone(),
        }
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
    ResBody: HttpBody<Data = Bytes> + From<String> + From<Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, Result<Response<ResBody>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        match self.route(&request) {
            Route::TopUp => {
                let header = request.headers().get(crate::wire::PAYMENT_CHANNEL).cloned();
                let meter = self.meter.clone();
                ResponseFuture::metered(async move { Ok(meter.accept_payment(header).await) })
            }
            Route::Negotiation(router) => ResponseFuture::metered(negotiate(router, request)),
            Route::NotPriced => {
                let refusal = Rejection::new(RejectionKind::RouteNotPriced, None)
                    .into_response(&self.meter.config.terms_url);
                ResponseFuture::metered(std::future::ready(Ok(refusal)))
            }
            Route::Free => ResponseFuture::free(self.call_unpaid(request, None)),
            Route::Shadow(price) => ResponseFuture::free(self.call_unpaid(request, Some(price))),
            Route::Paid(price) => {
                // Use the service that was driven to readiness; leave a fresh clone in its
                // place (https://docs.rs/tower/latest/tower/trait.Service.html#be-careful-when-cloning-inner-services).
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                ResponseFuture::metered(self.meter.clone().serve(inner, request, price))
            }
        }
    }
}

/// Where a request goes: the paywall's one decision, made before any work.
enum Route {
    /// `POST` to the payment path: a better payment without a request to pay for.
    TopUp,
    /// A negotiation endpoint (the terms, open, close…): the crate's own router.
    Negotiation(axum::Router),
    /// Not priced, and the pricing refuses what it does not price: 404 `route-not-priced`.
    NotPriced,
    /// Not priced: served free.
    Free,
    /// Priced, in shadow mode: counted and served unpaid.
    Shadow(MilliSats),
    /// Priced: the meter charges it.
    Paid(MilliSats),
}

impl<S, St: ChannelStore, P: Send + Sync + 'static> Paywall<S, St, P> {
    /// Routes `request`: the top-up endpoint, the negotiation endpoints, then by its price.
    fn route<B>(&self, request: &Request<B>) -> Route
    where
        P: Pricing<B>,
    {
        let path = request.uri().path();
        if request.method() == http::Method::POST
            && self.meter.config.payment_path.as_deref() == Some(path)
        {
            return Route::TopUp;
        }
        if let Some(endpoints) = &self.negotiation
            && let (prefix, router) = endpoints.get(&self.meter.config)
            && is_negotiation(path, prefix, &self.meter.config.terms_url)
        {
            return Route::Negotiation(router.clone());
        }
        match self.meter.config.pricing.priced(request) {
            Priced::Refused => Route::NotPriced,
            Priced::Free => Route::Free,
            Priced::Price(price) if self.meter.config.shadow.is_some() => Route::Shadow(price),
            Priced::Price(price) => Route::Paid(price),
        }
    }

    /// Calls the inner service with a request that is not charged: free, or (`shadow`)
    /// priced in shadow mode, counted and given what a handler of a paid request finds.
    /// The payment header, a bearer proof of the channel, is removed either way: the service
    /// of a request not charged has no more business with it than a paid one's.
    fn call_unpaid<ReqBody>(
        &mut self,
        mut request: Request<ReqBody>,
        shadow: Option<MilliSats>,
    ) -> S::Future
    where
        S: Service<Request<ReqBody>>,
    {
        if let (Some(price), Some(tally)) = (shadow, &self.meter.config.shadow) {
            tally.record(price);
            tracing::info!(%price, method = %request.method(), path = request.uri().path(), "shadow mode: served unpaid");
            let paid = Paid::shadow(price);
            let units: Arc<dyn super::stream::Units> = tally.clone();
            request.extensions_mut().insert(paid);
            request.extensions_mut().insert(super::StreamMeter::new(
                units,
                paid.channel,
                self.meter.config.stream_hold,
                None,
                price,
            ));
        }
        let _removed = self.meter.payment_header(&mut request);
        self.inner.call(request)
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
