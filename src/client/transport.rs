use core::fmt;
use core::marker::PhantomData;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Limited};
use tower::{BoxError, Service, ServiceExt};

/// Largest response body the client reads (negotiation answers and 402 problems).
pub(crate) const MAX_BODY: usize = 64 * 1024;

/// The future a [`Transport`] returns.
pub type TransportFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Response<Bytes>, BoxError>> + Send + 'a>>;

/// Sends the client's own requests to the server: fetching the terms, opening, funding and
/// closing a channel. [`PaymentService`](super::PaymentService) and the reqwest middleware
/// bring their own; [`ServiceTransport`] adapts any tower HTTP client.
pub trait Transport: Send + Sync {
    /// Sends `request` (an absolute URI) and returns the whole response.
    fn send(&self, request: Request<Bytes>) -> TransportFuture<'_>;
}

/// A [`Transport`] over a tower HTTP client service, such as hyper-util's `Client`: each
/// request goes through a clone of the service.
///
/// The service must not follow redirects (hyper-util's `Client` does not; do not wrap it in
/// tower-http's `FollowRedirect`): the payer's requests carry the `Payment-Channel` header or
/// a payment in their body, which must never leave the server's origin. A redirect then
/// reaches the payer as the server's refusal.
///
/// # Examples
///
/// ```
/// use bytes::Bytes;
/// use http::{Request, Response};
/// use http_body_util::Full;
/// use paychan::client::{ServiceTransport, Transport};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let echo = tower::service_fn(|request: Request<Full<Bytes>>| async move {
///     Ok::<_, std::convert::Infallible>(Response::new(request.into_body()))
/// });
/// let transport = ServiceTransport::<_, Full<Bytes>>::new(echo);
/// let request = Request::post("http://example.com/").body(Bytes::from("ping")).unwrap();
/// let response = transport.send(request).await.unwrap();
/// assert_eq!(response.body(), "ping");
/// # }
/// ```
pub struct ServiceTransport<S, ReqBody> {
    service: Mutex<S>,
    body: PhantomData<fn(ReqBody)>,
}

impl<S: fmt::Debug, ReqBody> fmt::Debug for ServiceTransport<S, ReqBody> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceTransport").field("service", &self.service).finish()
    }
}

impl<S, ReqBody> ServiceTransport<S, ReqBody> {
    /// Wraps `service`.
    pub fn new(service: S) -> Self {
        Self { service: Mutex::new(service), body: PhantomData }
    }
}

impl<S, ReqBody, ResBody> Transport for ServiceTransport<S, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    ReqBody: From<Bytes> + Send + 'static,
    ResBody: http_body::Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Into<BoxError>,
{
    fn send(&self, request: Request<Bytes>) -> TransportFuture<'_> {
        let service = self.service.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Box::pin(async move {
            let response = service.oneshot(request.map(ReqBody::from)).await.map_err(Into::into)?;
            read_body(response).await
        })
    }
}

/// Reads a whole response body, at most [`MAX_BODY`] bytes.
pub(crate) async fn read_body<B>(response: Response<B>) -> Result<Response<Bytes>, BoxError>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    let (parts, body) = response.into_parts();
    let bytes = Limited::new(body, MAX_BODY).collect().await?.to_bytes();
    Ok(Response::from_parts(parts, bytes))
}
