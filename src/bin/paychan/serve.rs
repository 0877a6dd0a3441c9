//! `paychan serve`: the paying reverse proxy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Uri};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use paychan::store::ChannelStore;
use paychan::wire::{PAYMENT_CHANNEL, Problem, ProblemCode};
use paychan::{Merchant, Paid};
use tokio::net::TcpListener;
use tower::ServiceExt as _;

use crate::admin::{self, Observed};
use crate::chain::Chain;
use crate::config::Config;
use crate::{Error, keys, net, with_store};

/// What the proxy handler needs.
struct Upstream {
    client: net::HttpClient<Body>,
    /// `http[s]://authority`.
    origin: String,
    /// The scheme clients reach the proxy with, for `X-Forwarded-Proto`.
    proto: &'static str,
    observed: Arc<Observed>,
    /// Whether the layer gives a 5xx's price back (then it is not revenue).
    refund_server_errors: bool,
}

impl Upstream {
    /// Counts what the layer charged for a request answered with `status`.
    fn count(&self, paid: Option<Paid>, status: StatusCode) {
        match paid.filter(|_| !(self.refund_server_errors && status.is_server_error())) {
            Some(paid) if paid.shadow => self.observed.shadow(paid.price),
            Some(paid) => self.observed.charge(paid.price),
            None => {}
        }
    }
}

/// Runs the proxy until SIGTERM or Ctrl-C.
pub(crate) async fn serve(config: Config) -> Result<(), Error> {
    let master = keys::read(&config.key_file, config.network)?;
    let chain = Chain::new(&config.chain)?;
    with_store!(&config.store_url, store => match config.leases {
        Some(leases) => {
            let store = paychan::store::Leased::with_config(store, leases);
            let served = run(config, master, chain, store.clone()).await;
            // After the last request: what this node holds goes back to the channels.
            let failed = store.return_all().await;
            if failed > 0 {
                tracing::warn!(failed, "leases not given back: they lapse after their ttl, forfeited");
            }
            served
        }
        None => run(config, master, chain, store).await,
    })
}

async fn run<St: ChannelStore + Clone + 'static>(
    config: Config,
    master: paychan::bitcoin::bip32::Xpriv,
    chain: Chain,
    store: St,
) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("listen {}: {e}", config.listen))?;
    let admin = match &config.admin {
        Some(admin) => {
            let token = keys::read_token(&admin.token_file)?;
            let listener = tokio::net::TcpListener::bind(admin.listen)
                .await
                .map_err(|e| format!("admin listen {}: {e}", admin.listen))?;
            Some((listener, token, admin.metrics_path.clone()))
        }
        None => None,
    };
    let paid = Merchant::new(config.network, master, config.payout_script.clone(), chain.clone())
        .with_store(store.clone())
        .with_terms(config.terms.clone())
        .with_funding_policy(config.funding)
        .with_prices(config.prices.describe())
        .with_intervals(config.tip_every, config.settle_every)
        .start(config.prices.clone())
        .await
        .map_err(|e| format!("the chain backend: {e}"))?;
    let mut layer = paid.layer().refund_server_errors(config.refund_server_errors);
    if config.shadow {
        tracing::warn!("shadow mode: every request is served unpaid");
        layer = layer.shadow();
    }
    let paid = Arc::new(paid);
    let observed = Arc::new(Observed::new());
    let upstream = Arc::new(Upstream {
        client: net::client(&[])?,
        origin: config.upstream.clone(),
        proto: if config.tls.is_some() { "https" } else { "http" },
        observed: Arc::clone(&observed),
        refund_server_errors: config.refund_server_errors,
    });
    let app = Router::new()
        .fallback(forward)
        .with_state(upstream)
        .layer(layer)
        .layer(axum::middleware::from_fn(reject_ambiguous_paths))
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&observed), admin::observe));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let admin_task = admin.map(|(listener, token, metrics_path)| {
        let settlement = Arc::clone(&paid);
        let state = Arc::new(admin::Admin {
            store,
            chain,
            observed: Arc::clone(&observed),
            settlement: Box::new(move || settlement.metrics()),
            token,
            title: format!("{} → {}", config.network, config.upstream),
        });
        let mut stopped = stopped.clone();
        tracing::info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "admin listener");
        tokio::spawn(async move {
            let app = admin::router(state, &metrics_path);
            let until = async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            };
            axum::serve(listener, app).with_graceful_shutdown(until).await
        })
    });
    tracing::info!(
        listen = %listener.local_addr()?,
        upstream = %config.upstream,
        network = %config.network,
        "paychan proxy started"
    );
    match &config.tls {
        Some((cert, key)) => {
            serve_tls(listener, app, net::server_config(cert, key)?, config.shutdown).await;
        }
        None => {
            // Requests in flight finish, within the deadline that starts at the signal.
            let (signalled, signal) = tokio::sync::oneshot::channel::<()>();
            let until = async move {
                shutdown().await;
                let _ = signalled.send(());
            };
            let server =
                axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
                    .with_graceful_shutdown(until)
                    .into_future();
            let deadline = async {
                if signal.await.is_ok() {
                    tokio::time::sleep(config.shutdown).await;
                }
            };
            tokio::select! {
                served = server => served?,
                () = deadline => {
                    tracing::warn!("connections still open after {:?}: closing them", config.shutdown);
                }
            }
        }
    }
    let _ = stop.send(true);
    if let Some(task) = admin_task {
        task.await??;
    }
    if let Ok(paid) = Arc::try_unwrap(paid) {
        paid.stop();
    }
    tracing::info!("paychan proxy stopped: in-flight requests finished");
    Ok(())
}

/// Serves `app` over TLS until SIGTERM or Ctrl-C, then finishes the requests in flight.
async fn serve_tls(
    listener: TcpListener,
    app: Router,
    tls: Arc<rustls::ServerConfig>,
    deadline: Duration,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
    let stop = shutdown();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors, say: wait instead of spinning.
                        tracing::warn!(%error, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (acceptor, app, watcher) = (acceptor.clone(), app.clone(), graceful.watcher());
                tokio::spawn(async move {
                    let handshake = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp));
                    let Ok(Ok(tls)) = handshake.await else { return };
                    let app = app.map_request(move |mut request: http::Request<Incoming>| {
                        request.extensions_mut().insert(ConnectInfo(peer));
                        request
                    });
                    // A client that never finishes its headers is dropped.
                    let connection = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(30))
                        .serve_connection(TokioIo::new(tls), TowerToHyperService::new(app));
                    let _ = watcher.watch(connection).await;
                });
            }
            () = &mut stop => break,
        }
    }
    // Requests in flight finish, within the deadline.
    if tokio::time::timeout(deadline, graceful.shutdown()).await.is_err() {
        tracing::warn!("connections still open after {deadline:?}: closing them");
    }
}

/// Whether `path` could mean another path to the upstream than the one it was priced as: dot
/// segments, empty segments, backslashes, or percent-encoded dots, slashes and backslashes
/// (a free `/public/{*rest}` must not reach `/public/../paid`).
fn ambiguous(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    path.contains('\\')
        || ["%2e", "%2f", "%5c"].iter().any(|encoded| lower.contains(encoded))
        || segments
            .iter()
            .enumerate()
            .any(|(i, segment)| matches!(*segment, "." | "..") || (segment.is_empty() && i != last))
}

/// Refuses (400) a request whose path is [`ambiguous`], before it is priced.
async fn reject_ambiguous_paths(request: Request, next: axum::middleware::Next) -> Response {
    if ambiguous(request.uri().path()) {
        let problem = Problem::new(
            StatusCode::BAD_REQUEST,
            ProblemCode::BadRequest,
            "the path has dot or empty segments, or encoded separators",
        );
        return problem.into_response();
    }
    next.run(request).await
}

/// SIGTERM or Ctrl-C.
async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down: finishing in-flight requests");
}

/// The hop-by-hop headers (RFC 9110 §7.6.1), never forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Forwards a paid request to the upstream, streaming both bodies.
async fn forward(
    State(upstream): State<Arc<Upstream>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let Ok(uri) = format!("{}{path}", upstream.origin).parse::<Uri>() else {
        return Problem::new(StatusCode::BAD_REQUEST, ProblemCode::BadRequest, "bad path")
            .into_response();
    };
    parts.uri = uri;
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers);
    // The payment is the proxy's business; the upstream never sees the credential.
    headers.remove(PAYMENT_CHANNEL);
    if let Some(host) = headers.remove(header::HOST) {
        headers.insert("x-forwarded-host", host);
    }
    let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(earlier) => format!("{earlier}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
        headers.insert("x-forwarded-for", value);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static(upstream.proto));
    let paid = parts.extensions.get::<Paid>().copied();
    match upstream.client.request(http::Request::from_parts(parts, body)).await {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            upstream.count(paid, parts.status);
            Response::from_parts(parts, Body::new(body))
        }
        Err(error) => {
            tracing::warn!(%error, "upstream unreachable");
            upstream.count(paid, StatusCode::BAD_GATEWAY);
            Problem::new(
                StatusCode::BAD_GATEWAY,
                ProblemCode::UpstreamUnavailable,
                "the upstream did not answer",
            )
            .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ambiguous;

    #[test]
    fn paths_that_could_reach_another_route_are_ambiguous() {
        for path in ["/", "/hello", "/a/b.txt", "/dir/", "/files/.hidden", "/a..b"] {
            assert!(!ambiguous(path), "{path}");
        }
        for path in [
            "/public/../paid",
            "/public/..",
            "/./paid",
            "//paid",
            "/a//b",
            "/public/%2e%2e/paid",
            "/public/%2E%2E/paid",
            "/public/..%2fpaid",
            "/public\\..\\paid",
            "/a/%5cb",
        ] {
            assert!(ambiguous(path), "{path}");
        }
    }
}
