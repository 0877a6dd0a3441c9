use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use tower::{BoxError, Service, ServiceExt};

use std::sync::Arc;

use crate::client::attempts::{self, Attempt, Exchange, PaidAnswer, Retry, balance};
use crate::client::stream::{Hooks, PaidBody};
use crate::client::transport::read_body;
use crate::client::{
    ClientError, ClientStore, Closed, MemoryClientStore, Payer, ServiceTransport, Transport,
};
use crate::wire::ChannelId;

/// The service [`PaymentLayer`](super::PaymentLayer) produces.
///
/// The request body must be `Clone` (a request is sent again after paying) and buildable from
/// [`Bytes`] (for the client's own negotiation requests): `http_body_util::Full<Bytes>` or
/// `String` work. A request whose URI is not on the payer's server passes through untouched.
///
/// A 402 the client cannot or may not act on is an error ([`ClientError::Rejected`], or
/// [`ClientError::Policy`] for a policy refusal); a 402 that remains after the client paid is
/// returned as the response.
#[derive(Debug)]
pub struct PaymentService<S, St = MemoryClientStore> {
    inner: S,
    payer: Payer<St>,
}

impl<S: Clone, St> Clone for PaymentService<S, St> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone(), payer: self.payer.clone() }
    }
}

impl<S, St: ClientStore> PaymentService<S, St> {
    /// Wraps `inner`, paying with `payer`.
    pub fn new(inner: S, payer: Payer<St>) -> Self {
        Self { inner, payer }
    }

    /// The payer.
    pub fn payer(&self) -> &Payer<St> {
        &self.payer
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, St> PaymentService<S, St>
where
    St: ClientStore,
{
    /// Opens a channel now instead of on the first 402 (see [`Payer::open`]). The client's
    /// requests go through the wrapped service with a body of type `ReqBody` (inferred for
    /// hyper-util's `Client`).
    ///
    /// # Errors
    ///
    /// As [`Payer::open`].
    pub async fn open<ReqBody>(&self) -> Result<ChannelId, ClientError>
    where
        S: Clone,
        ServiceTransport<S, ReqBody>: Transport,
    {
        self.payer.open_via(&ServiceTransport::new(self.inner.clone())).await
    }

    /// Closes the channel cooperatively (see [`Payer::close`]).
    ///
    /// # Errors
    ///
    /// As [`Payer::close`].
    pub async fn close<ReqBody>(&self) -> Result<Closed, ClientError>
    where
        S: Clone,
        ServiceTransport<S, ReqBody>: Transport,
    {
        self.payer.close_via(&ServiceTransport::new(self.inner.clone())).await
    }
}

/// The response future of [`PaymentService`].
pub type ResponseFuture<B> =
    Pin<Box<dyn Future<Output = Result<Response<PaidBody<B>>, ClientError>> + Send + 'static>>;

impl<S, St, ReqBody, ResBody> Service<Request<ReqBody>> for PaymentService<S, St>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    St: ClientStore + 'static,
    ReqBody: From<Bytes> + Clone + Send + 'static,
    ResBody: http_body::Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<PaidBody<ResBody>>;
    type Error = ClientError;
    type Future = ResponseFuture<ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(|e| ClientError::Transport(e.into()))
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The readied service handles this request; a clone stays for the next one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let payer = self.payer.clone();
        Box::pin(async move {
            if !payer.applies_to(request.uri()) {
                return inner
                    .call(request)
                    .await
                    .map(|r| r.map(PaidBody::plain))
                    .map_err(transport);
            }
            let (parts, body) = request.into_parts();
            let negotiation = ServiceTransport::new(inner.clone());
            let retry = Retry::new(&payer, &parts.method, parts.uri.path(), &parts.headers);
            let exchange =
                TowerExchange { payer: payer.clone(), inner, parts, body, called: false };
            attempts::pay(retry, exchange, &negotiation).await
        })
    }
}

fn transport(e: impl Into<BoxError>) -> ClientError {
    ClientError::Transport(e.into())
}

fn copy<B: Clone>(parts: &http::request::Parts, body: &B) -> Request<B> {
    let mut request = Request::new(body.clone());
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    *request.extensions_mut() = parts.extensions.clone();
    request
}

/// A request through a tower service: the shared pay loop's [`Exchange`].
struct TowerExchange<S, St, B> {
    payer: Payer<St>,
    inner: S,
    parts: http::request::Parts,
    body: B,
    /// Whether `inner` was called: it is readied again before the next call.
    called: bool,
}

/// Bounds: what the adapter itself uses; the `Send` the boxed future needs is the service's
/// (see the [`Service`] impl above).
impl<S, St, ReqBody, ResBody> Exchange for TowerExchange<S, St, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + 'static,
    S::Error: Into<BoxError>,
    St: ClientStore + 'static,
    ReqBody: Clone + 'static,
    ResBody: http_body::Body,
    ResBody::Error: Into<BoxError>,
    ServiceTransport<S, ReqBody>: Transport,
{
    type Response = Response<ResBody>;
    type Output = Response<PaidBody<ResBody>>;
    type Error = ClientError;

    /// The first call uses the service the caller readied; the next are readied again.
    async fn ready(&mut self) -> Result<(), ClientError> {
        if self.called {
            self.inner.ready().await.map_err(transport)?;
        }
        Ok(())
    }

    async fn send(&mut self, attempt: &Attempt) -> Result<(Self::Response, bool), ClientError> {
        self.called = true;
        let mut request = copy(&self.parts, &self.body);
        attempt.apply(request.headers_mut());
        Ok((self.inner.call(request).await.map_err(transport)?, true))
    }

    fn head(response: &Self::Response) -> (StatusCode, &http::HeaderMap) {
        (response.status(), response.headers())
    }

    /// A tower service follows no redirect: the answer is the request's.
    fn answered_at(&self, _: &Self::Response) -> Option<String> {
        Some(self.parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned())
    }

    async fn read_body(response: Self::Response) -> Result<Bytes, ClientError> {
        Ok(read_body(response).await.map_err(ClientError::Transport)?.into_body())
    }

    fn finish(&self, response: Self::Response, paid: Option<PaidAnswer>) -> Self::Output {
        let (head, body) = response.into_parts();
        let body = match paid {
            Some(PaidAnswer { sent, prev, path }) => {
                let hooks = Hooks {
                    payer: self.payer.clone(),
                    transport: Arc::new(ServiceTransport::new(self.inner.clone())),
                    sent,
                    method: self.parts.method.to_string(),
                    path,
                    prev,
                };
                let balance = balance(&head.headers);
                PaidBody::paid(body, &head.headers, hooks, self.payer.policy(), balance)
            }
            None => PaidBody::plain(body),
        };
        Response::from_parts(head, body)
    }

    fn error(error: ClientError) -> ClientError {
        error
    }
}
