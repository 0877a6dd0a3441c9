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
use super::{Paid, PaywallLayer, Pricing};
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
        Self { inner, meter: layer.meter.clone(), negotiation: layer.endpoints() }
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
        if let Some(path) = &self.meter.payment_path
            && request.method() == http::Method::POST
            && request.uri().path() == path
        {
            let header = request.headers().get(crate::wire::PAYMENT_CHANNEL).cloned();
            let meter = self.meter.clone();
            return ResponseFuture::metered(async move { Ok(meter.accept_payment(header).await) });
        }
        if let Some(endpoints) = &self.negotiation
            && let (prefix, router) = endpoints.get(&self.meter)
            && is_negotiation(request.uri().path(), prefix, &self.meter.terms_url)
        {
            let router = router.clone();
            return ResponseFuture::metered(negotiate(router, request));
        }
        let Some(price) = self.meter.pricing.price(&request) else {
            if self.meter.pricing.refuses(&request) {
                let refusal = Rejection::new(RejectionKind::RouteNotPriced, None)
                    .into_response(&self.meter.terms_url);
                return ResponseFuture::metered(std::future::ready(Ok(refusal)));
            }
            // A bearer proof of the channel (clients send it with every request to the
            // origin): a free route's service has no more business with it than a paid one's.
            let mut request = request;
            let _removed = self.meter.payment_header(&mut request);
            return ResponseFuture::free(self.inner.call(request));
        };
        if let Some(tally) = &self.meter.shadow {
            tally.record(price);
            tracing::info!(%price, method = %request.method(), path = request.uri().path(), "shadow mode: served unpaid");
            let mut request = request;
            let paid = Paid::shadow(price);
            let units: Arc<dyn super::stream::Units> = tally.clone();
            let hold = self.meter.stream_hold;
            request.extensions_mut().insert(paid);
            request.extensions_mut().insert(super::StreamMeter::new(
                units,
                paid.channel,
                hold,
                None,
                price,
            ));
            let _removed = self.meter.payment_header(&mut request);
            return ResponseFuture::free(self.inner.call(request));
        }
        // Use the service that was driven to readiness; leave a fresh clone in its place
        // (https://docs.rs/tower/latest/tower/trait.Service.html#be-careful-when-cloning-inner-services).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::metered(self.meter.clone().serve(inner, request, price))
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
