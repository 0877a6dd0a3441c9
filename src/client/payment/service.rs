use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use tower::{BoxError, Service, ServiceExt};

use std::sync::Arc;

use crate::client::attempts::{Retry, balance};
use crate::client::stream::{Hooks, PaidBody};
use crate::client::transport::read_body;
use crate::client::{
    ClientError, ClientStore, Closed, MemoryClientStore, Payer, ServiceTransport, Transport,
};
use crate::wire::{ChannelId, PAYMENT_CHANNEL};

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
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(pay_and_send(self.payer.clone(), inner, request))
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

async fn pay_and_send<S, St, ReqBody, ResBody>(
    payer: Payer<St>,
    mut inner: S,
    request: Request<ReqBody>,
) -> Result<Response<PaidBody<ResBody>>, ClientError>
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
    if !payer.applies_to(request.uri()) {
        return inner.call(request).await.map(|r| r.map(PaidBody::plain)).map_err(transport);
    }
    let (parts, body) = request.into_parts();
    let negotiation = ServiceTransport::new(inner.clone());
    let mut retry = Retry::new(&payer, &parts.method, parts.uri.path(), &parts.headers);
    loop {
        let header = retry.start().await?;
        let mut request = copy(&parts, &body);
        request.headers_mut().remove(PAYMENT_CHANNEL);
        if let Some(header) = header {
            request.headers_mut().insert(PAYMENT_CHANNEL, header);
        }
        for (name, value) in retry.receipt_headers() {
            request.headers_mut().remove(name);
            if let Some(value) = value {
                request.headers_mut().insert(name, value);
            }
        }
        let response = inner.call(request).await.map_err(transport)?;
        if response.status() != StatusCode::PAYMENT_REQUIRED || retry.is_last() {
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let (sent, prev) = (retry.sent().cloned(), retry.prev());
            retry.answered(response.status(), response.headers(), path).await;
            let (head, body) = response.into_parts();
            let body = match sent {
                Some(sent) => {
                    let hooks = Hooks {
                        payer: payer.clone(),
                        transport: Arc::new(negotiation),
                        sent,
                        method: parts.method.to_string(),
                        path: path.to_owned(),
                        prev,
                    };
                    PaidBody::paid(
                        body,
                        &head.headers,
                        hooks,
                        payer.policy(),
                        balance(&head.headers),
                    )
                }
                _ => PaidBody::plain(body),
            };
            return Ok(Response::from_parts(head, body));
        }
        let status = response.status();
        let response = read_body(response).await.map_err(ClientError::Transport)?;
        let (headers, body) = (response.headers(), response.body());
        retry.payment_required(&negotiation, status, headers, body).await?;
        inner.ready().await.map_err(transport)?;
    }
}
