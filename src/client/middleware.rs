//! [`PaymentMiddleware`]: channel payments for `reqwest-middleware` clients.

use bytes::Bytes;
use http::{Extensions, StatusCode, Uri};
use reqwest_middleware::{Middleware, Next};

use reqwest::ResponseBuilderExt as _;

use super::attempts::{self, Attempt, Exchange, PaidAnswer, Retry, balance};
use super::payer::CurrentPayment;
use super::stream::{Hooks, PaidBody};
use super::transport::MAX_BODY;
use super::{ClientError, ClientStore, MemoryClientStore, Payer, Transport, TransportFuture};
use crate::wire::PAYMENT_CHANNEL_STREAM;

/// Adds channel payments to a `reqwest-middleware` client: every request to the [`Payer`]'s
/// server carries the `Payment-Channel` header, and a 402 is answered by paying (top-up or a
/// new channel, within the policy) and retrying — the same behaviour as
/// [`PaymentLayer`](super::PaymentLayer).
///
/// A request whose body cannot be cloned (a stream) is sent once, without a retry. Errors of
/// the client ([`ClientError`]) are `reqwest_middleware::Error::Middleware`.
///
/// **Redirects.** reqwest follows redirects inside the client, with the request's headers: a
/// redirect to another origin would carry the `Payment-Channel` header (a bearer credential
/// for the channel's balance) there, and the middleware cannot see it happen. So the
/// middleware sends the header only through a client known to stop at such a redirect: one
/// built by [`PaymentMiddleware::client`] (with [`PaymentMiddleware::redirect_policy`]: the
/// caller gets the 3xx), as in the example. A middleware made with [`new`](Self::new) and
/// added to a client by hand refuses to pay ([`ClientError::RedirectsNotChecked`]) until it is
/// told the client is safe ([`redirects_checked`](Self::redirects_checked)). An answer from
/// another origin never drives a payment and is returned as it is.
///
/// # Examples
///
/// ```
/// use bitcoin::Network;
/// use bitcoin::bip32::Xpriv;
/// use paychan::client::{Payer, PaymentMiddleware};
///
/// let key = Xpriv::new_master(Network::Regtest, &[7; 32]).unwrap();
/// let payer = Payer::builder("http://127.0.0.1:3000", Network::Regtest, key).build().unwrap();
/// let client = PaymentMiddleware::client(payer, reqwest::Client::builder()).unwrap().build();
/// # let _ = client;
/// ```
#[derive(Debug)]
pub struct PaymentMiddleware<St = MemoryClientStore> {
    payer: Payer<St>,
    /// The client a stream's top-ups use when the payer has no transport of its own.
    fallback: std::sync::OnceLock<Result<std::sync::Arc<ReqwestTransport>, String>>,
    /// Set when the reqwest client is known to stop at a redirect off the payer's origin.
    redirects_checked: bool,
}

impl<St: ClientStore + 'static> PaymentMiddleware<St> {
    /// A `reqwest-middleware` client builder paying with `payer`: the reqwest client is built
    /// from `http` with [`redirect_policy`](Self::redirect_policy) (whatever redirect policy
    /// `http` had), and this middleware is its first. Add other middlewares to it and build.
    ///
    /// # Errors
    ///
    /// reqwest's, if the client cannot be built.
    pub fn client(
        payer: Payer<St>,
        http: reqwest::ClientBuilder,
    ) -> reqwest::Result<reqwest_middleware::ClientBuilder> {
        let http = http.redirect(Self::redirect_policy(&payer)).build()?;
        Ok(reqwest_middleware::ClientBuilder::new(http).with(Self::new(payer).redirects_checked()))
    }
}

impl<St: ClientStore> PaymentMiddleware<St> {
    /// Pays with `payer`, once the client it is added to is declared safe
    /// ([`redirects_checked`](Self::redirects_checked)); see [`client`](Self::client).
    pub fn new(payer: Payer<St>) -> Self {
        Self { payer, fallback: std::sync::OnceLock::new(), redirects_checked: false }
    }

    /// Declares that the reqwest client this middleware is added to never follows a redirect
    /// from the payer's origin to another (built with
    /// `redirect(PaymentMiddleware::redirect_policy(&payer))` or
    /// `redirect(reqwest::redirect::Policy::none())`). Without it the middleware does not send
    /// the payment header.
    pub fn redirects_checked(mut self) -> Self {
        self.redirects_checked = true;
        self
    }

    /// The payer.
    pub fn payer(&self) -> &Payer<St> {
        &self.payer
    }

    /// A reqwest redirect policy that keeps the `Payment-Channel` header at home: it follows
    /// up to 10 redirects, except one from the payer's origin to another origin, where it
    /// stops and returns the redirect to the caller. Redirects between other origins are
    /// followed as reqwest's default policy does.
    pub fn redirect_policy(payer: &Payer<St>) -> reqwest::redirect::Policy
    where
        St: 'static,
    {
        let payer = payer.clone();
        let home = move |url: &reqwest::Url| at_home(&payer, url);
        reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > 10 {
                attempt.error("too many redirects")
            } else if attempt.previous().last().is_some_and(&home) && !home(attempt.url()) {
                attempt.stop()
            } else {
                attempt.follow()
            }
        })
    }
}

impl<St: ClientStore + 'static> PaymentMiddleware<St> {
    /// A metered stream's response, read through [`PaidBody`]: its top-ups go through the
    /// payer's own [transport](super::PayerBuilder::transport), or a default reqwest client.
    fn paid_stream(
        &self,
        response: reqwest::Response,
        sent: CurrentPayment,
        prev: Option<[u8; 32]>,
        method: &str,
        path: String,
    ) -> reqwest::Response {
        let url = response.url().clone();
        let transport = self.payer.own_transport().unwrap_or_else(|_| {
            let client = self.fallback.get_or_init(|| {
                // No redirects: the payment header stays on the payer's origin.
                ReqwestTransport::new().map(std::sync::Arc::new).map_err(|e| e.to_string())
            });
            match client {
                Ok(client) => std::sync::Arc::clone(client) as std::sync::Arc<dyn Transport>,
                Err(e) => std::sync::Arc::new(Unreachable(e.clone())),
            }
        });
        let balance = balance(response.headers());
        let (mut head, body) = http::Response::<reqwest::Body>::from(response).into_parts();
        // The URL travels in an extension only reqwest's builder extension can make.
        if let Ok(marker) = http::Response::builder().url(url).body(()) {
            head.extensions.extend(marker.into_parts().0.extensions);
        }
        let hooks = Hooks {
            payer: self.payer.clone(),
            transport,
            sent,
            method: method.to_owned(),
            path,
            prev,
        };
        let body = PaidBody::paid(body, &head.headers, hooks, self.payer.policy(), balance);
        reqwest::Response::from(http::Response::from_parts(head, reqwest::Body::wrap(body)))
    }
}

/// Whether `url` is on `payer`'s origin.
fn at_home<St: ClientStore>(payer: &Payer<St>, url: &reqwest::Url) -> bool {
    url.as_str().parse::<Uri>().is_ok_and(|uri| payer.applies_to(&uri))
}

fn middleware_error(error: ClientError) -> reqwest_middleware::Error {
    reqwest_middleware::Error::middleware(error)
}

#[async_trait::async_trait]
impl<St: ClientStore + 'static> Middleware for PaymentMiddleware<St> {
    async fn handle(
        &self,
        request: reqwest::Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        if !at_home(&self.payer, request.url()) {
            return next.run(request, extensions).await;
        }
        if !self.redirects_checked {
            return Err(middleware_error(ClientError::RedirectsNotChecked));
        }
        let negotiation = NextTransport { next: next.clone() };
        let retry =
            Retry::new(&self.payer, request.method(), request.url().path(), request.headers());
        let method = request.method().clone();
        let exchange =
            ReqwestExchange { middleware: self, request: Some(request), next, extensions, method };
        attempts::pay(retry, exchange, &negotiation).await
    }
}

/// A request through the rest of a reqwest middleware chain: the shared pay loop's
/// [`Exchange`].
struct ReqwestExchange<'a, 'e, St> {
    middleware: &'a PaymentMiddleware<St>,
    /// The request as the caller made it; taken by its last send when its body cannot be
    /// copied (a stream is sent once, as it is; its answer is counted as any other).
    request: Option<reqwest::Request>,
    next: Next<'a>,
    extensions: &'e mut Extensions,
    method: http::Method,
}

impl<St: ClientStore + 'static> Exchange for ReqwestExchange<'_, '_, St> {
    type Response = reqwest::Response;
    type Output = reqwest::Response;
    type Error = reqwest_middleware::Error;

    /// A middleware chain is always ready.
    async fn ready(&mut self) -> reqwest_middleware::Result<()> {
        Ok(())
    }

    async fn send(
        &mut self,
        attempt: &Attempt,
    ) -> reqwest_middleware::Result<(reqwest::Response, bool)> {
        let copy = self.request.as_ref().and_then(reqwest::Request::try_clone);
        let again = copy.is_some();
        let Some(mut request) = copy.or_else(|| self.request.take()) else {
            return Err(middleware_error(ClientError::Transport("the request was sent".into())));
        };
        attempt.apply(request.headers_mut());
        Ok((self.next.clone().run(request, self.extensions).await?, again))
    }

    fn head(response: &reqwest::Response) -> (StatusCode, &http::HeaderMap) {
        (response.status(), response.headers())
    }

    /// The answer's URL: the request charged last, after the redirects reqwest followed; an
    /// answer from another origin is not the server's (its 402 drives no payment, its
    /// balance is not the channel's).
    fn answered_at(&self, response: &reqwest::Response) -> Option<String> {
        let url = response.url();
        at_home(&self.middleware.payer, url).then(|| match url.query() {
            Some(query) => format!("{}?{query}", url.path()),
            None => url.path().to_owned(),
        })
    }

    async fn read_body(response: reqwest::Response) -> reqwest_middleware::Result<Bytes> {
        read_limited(response).await.map_err(|e| middleware_error(ClientError::Transport(e)))
    }

    fn finish(&self, response: reqwest::Response, paid: Option<PaidAnswer>) -> reqwest::Response {
        match paid {
            Some(PaidAnswer { sent, prev, path })
                if response.headers().contains_key(PAYMENT_CHANNEL_STREAM) =>
            {
                self.middleware.paid_stream(response, sent, prev, self.method.as_str(), path)
            }
            _ => response,
        }
    }

    fn error(error: ClientError) -> reqwest_middleware::Error {
        middleware_error(error)
    }
}

async fn read_limited(mut response: reqwest::Response) -> Result<Bytes, tower::BoxError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err("response body too large".into());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.into())
}

async fn send(
    run: impl AsyncFnOnce(reqwest::Request) -> Result<reqwest::Response, tower::BoxError>,
    request: http::Request<Bytes>,
) -> Result<http::Response<Bytes>, tower::BoxError> {
    let request = reqwest::Request::try_from(request.map(reqwest::Body::from))?;
    let response = run(request).await?;
    let mut head = http::Response::builder().status(response.status()).version(response.version());
    if let Some(headers) = head.headers_mut() {
        *headers = response.headers().clone();
    }
    let body = read_limited(response).await?;
    Ok(head.body(body)?)
}

/// No way to the server: every request fails with why.
struct Unreachable(String);

impl Transport for Unreachable {
    fn send(&self, _: http::Request<Bytes>) -> TransportFuture<'_> {
        let error = self.0.clone();
        Box::pin(async move { Err(format!("no client for top-ups: {error}").into()) })
    }
}

/// The client's own requests through the rest of the middleware chain.
struct NextTransport<'a> {
    next: Next<'a>,
}

impl Transport for NextTransport<'_> {
    fn send(&self, request: http::Request<Bytes>) -> TransportFuture<'_> {
        let next = self.next.clone();
        Box::pin(send(
            async move |request| {
                let mut extensions = Extensions::new();
                Ok(next.run(request, &mut extensions).await?)
            },
            request,
        ))
    }
}

/// A [`Transport`] over reqwest for the payer's own requests ([`Payer::open`],
/// [`Payer::close`], a stream's top-ups): its client never follows a redirect, since those
/// requests carry the payment header or a payment in their body (a redirect is answered as
/// the server's refusal).
///
/// # Examples
///
/// ```
/// use paychan::bitcoin::{Network, bip32::Xpriv};
/// use paychan::client::{Payer, ReqwestTransport};
///
/// let key = Xpriv::new_master(Network::Regtest, &[7; 32]).unwrap();
/// let payer = Payer::builder("http://127.0.0.1:3000", Network::Regtest, key)
///     .transport(ReqwestTransport::new().unwrap())
///     .build()
///     .unwrap();
/// # drop(payer);
/// ```
#[derive(Debug, Clone)]
pub struct ReqwestTransport(reqwest::Client);

impl ReqwestTransport {
    /// A transport over a default reqwest client, without redirects.
    ///
    /// # Errors
    ///
    /// reqwest's, if the client cannot be built.
    pub fn new() -> reqwest::Result<Self> {
        Self::from_builder(reqwest::Client::builder())
    }

    /// A transport over the client `http` builds, without redirects (whatever redirect policy
    /// it had).
    ///
    /// # Errors
    ///
    /// reqwest's, if the client cannot be built.
    pub fn from_builder(http: reqwest::ClientBuilder) -> reqwest::Result<Self> {
        http.redirect(reqwest::redirect::Policy::none()).build().map(Self)
    }
}

impl Transport for ReqwestTransport {
    fn send(&self, request: http::Request<Bytes>) -> TransportFuture<'_> {
        Box::pin(send(async move |request| Ok(self.0.execute(request).await?), request))
    }
}
