//! `paychan serve`: the paying reverse proxy.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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
use paychan::server::ActualCost;
use paychan::server::Paid;
use paychan::store::ChannelStore;
use paychan::wire::{PAYMENT_CHANNEL, Problem, ProblemCode};
use paychan::{Merchant, MilliSats};
use tokio::net::TcpListener;
use tower::ServiceExt as _;

use crate::admin::{self, Observed};
use crate::chain::Chain;
use crate::config::{ChainSource, Config, Listener};
use crate::prices::{LivePrices, Reloader};
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
    credit_server_errors: bool,
    /// Whether the peer is a front proxy whose `X-Forwarded-For` is kept (appended to).
    trust_forwarded_for: bool,
}

impl Upstream {
    /// Counts what the layer charged for a request answered with `status` (nothing if the
    /// layer `gives_back` its price).
    fn count(&self, paid: Option<Paid>, status: StatusCode, gives_back: bool) {
        let refunded = gives_back || (self.credit_server_errors && status.is_server_error());
        match paid.filter(|_| !refunded) {
            Some(paid) if paid.shadow => self.observed.shadow(paid.price),
            Some(paid) => {
                self.observed.charge(paid.price);
                self.observed.charged_on(paid.channel);
            }
            None => {}
        }
    }
}

/// Runs the proxy until SIGTERM or Ctrl-C; SIGHUP reloads the prices from `path`.
pub(crate) async fn serve(config: Config, path: PathBuf) -> Result<(), Error> {
    // SIGHUP reloads the prices once serving; caught from the start (its default ends the
    // process), a hangup during start-up is taken as a reload once the prices are live.
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let master = keys::read(&config.key_file, config.network)?;
    let bump = match cpfp(&config)? {
        Cpfp::On(key, reason) => {
            tracing::info!("{reason}");
            Some(key)
        }
        Cpfp::Off(reason) => {
            tracing::warn!("{reason}");
            None
        }
    };
    let chain = Chain::new(&config.chain)?;
    // Before the store is opened and the listener bound: a server on another network's chain
    // would take that network's coins as payment.
    check_network(&chain, &config).await?;
    check_relay_fee(&chain, &config).await.map_err(|e| format!("{e}; refusing to serve"))?;
    with_store!(&config.store_url, store => match config.leases {
        Some(leases) => {
            let store = paychan::store::Leased::with_config(store, leases);
            let served = run(config, (&path, hangups), master, bump, chain, store.clone()).await;
            // After the last request: what this node holds goes back to the channels.
            let failed = store.return_all().await;
            if failed > 0 {
                tracing::warn!(failed, "leases not given back: they lapse after their ttl, forfeited");
            }
            served
        }
        None => run(config, (&path, hangups), master, bump, chain, store).await,
    })
}

/// Whether the settlement task can bump closes by CPFP, and why (for the log and `doctor`).
pub(crate) enum Cpfp {
    /// The bump key, whose P2WPKH is the payout script.
    On(paychan::bitcoin::secp256k1::SecretKey, String),
    /// No CPFP: what it costs and how to change it.
    Off(String),
}

/// The key the settlement task signs CPFP children with: the bump key, when its P2WPKH is the
/// payout script (a child spends the server's output of a close). An unreadable bump key, or
/// one for another network, is an error.
pub(crate) fn cpfp(config: &Config) -> Result<Cpfp, Error> {
    let Some(path) = &config.bump_key_file else {
        return Ok(Cpfp::Off(
            "no bump_key_file in the config: closes cannot be bumped by CPFP, and one below the \
             mempool minimum waits (paychan_closes_below_mempool_minimum). `paychan init` \
             writes one (PRODUCTION.md, \"CPFP: the bump key\")"
                .to_owned(),
        ));
    };
    let key = keys::read_bump(path, config.network)?;
    let address = keys::bump_address(&key, config.network);
    if address.script_pubkey() != config.payout_script {
        return Ok(Cpfp::Off(format!(
            "payout_address is not the bump key's address: closes cannot be bumped by CPFP (a \
             CPFP child spends the payout output, so the bump key must own it), and one below \
             the mempool minimum waits (paychan_closes_below_mempool_minimum). For CPFP, set \
             payout_address = \"{address}\", the bump key's address (new channels only)"
        )));
    }
    Ok(Cpfp::On(
        key.inner,
        format!(
            "CPFP on: payout_address is the bump key's address, so a close below the mempool \
             minimum goes out with a child paid from the payout output ({})",
            path.display()
        ),
    ))
}

/// `sat/vB` of `rate`, with decimals only when it has them (`1`, `0.1`).
fn sat_vb(rate: paychan::bitcoin::FeeRate) -> String {
    let kwu = rate.to_sat_per_kwu();
    // f64's Display is the shortest form that reads back: 0.1, 2.5.
    if kwu.is_multiple_of(250) { (kwu / 250).to_string() } else { (kwu as f64 / 250.0).to_string() }
}

/// Refuses terms whose fee rates the node cannot relay: a minimum relay fee above
/// `terms.max_fee_rate_sat_vb` (every channel would be agreed above the operator's maximum,
/// since no close below the floor can be broadcast). The answer when they agree.
pub(crate) async fn check_relay_fee(chain: &Chain, config: &Config) -> Result<String, Error> {
    use paychan::chain::ChainBackend as _;
    let (backend, key, _) = backend(config);
    let floor = chain.min_relay_fee_rate().await.map_err(|error| {
        format!("{backend} at [chain] {key}, asked for its minimum relay fee: {error}")
    })?;
    let terms = &config.terms;
    let (min, max) = (sat_vb(terms.min_fee_rate), sat_vb(terms.max_fee_rate));
    if floor > terms.max_fee_rate {
        return Err(format!(
            "fee rates: {backend}'s minimum relay fee is {} sat/vB, above \
             terms.max_fee_rate_sat_vb = {max}; no close below it can be broadcast, so channels \
             would be agreed above your maximum. Raise terms.max_fee_rate_sat_vb to at least {}, \
             or lower the node's -minrelaytxfee",
            sat_vb(floor),
            floor.to_sat_per_vb_ceil()
        )
        .into());
    }
    Ok(if floor > terms.min_fee_rate {
        format!(
            "{backend}'s minimum relay fee is {} sat/vB: channels are offered at least that, \
             above terms.min_fee_rate_sat_vb = {min}",
            sat_vb(floor)
        )
    } else {
        format!(
            "{backend}'s minimum relay fee, {} sat/vB, is within the terms' {min} to {max} sat/vB",
            sat_vb(floor)
        )
    })
}

/// The chain backend in messages: what it is, its config key, and what to call another one.
fn backend(config: &Config) -> (&'static str, &'static str, &'static str) {
    match &config.chain {
        ChainSource::Bitcoind { .. } => ("the Bitcoin Core node", "bitcoind_url", "node"),
        ChainSource::Esplora { .. } => ("the Esplora server", "esplora_url", "server"),
    }
}

/// Refuses to serve when the chain backend is on another network than the config's
/// `network`, saying what to change. The answer when they agree.
pub(crate) async fn check_network(chain: &Chain, config: &Config) -> Result<String, Error> {
    use paychan::chain::ChainError;
    let (backend, key, kind) = backend(config);
    match paychan::chain::check_network(chain, config.network).await {
        Ok(()) => Ok(format!(
            "{backend} at [chain] {key} is on {}, as network = \"{}\"",
            config.network, config.network
        )),
        Err(ChainError::WrongNetwork { expected, actual }) => Err(format!(
            "wrong network: {backend} at [chain] {key} is on {actual}, but the config sets \
             network = \"{expected}\"; refusing to serve (clients would pay in {actual} coins). \
             Point {key} at a {kind} on {expected}, or set network = \"{actual}\" (with a \
             payout_address and a key file of that network)"
        )
        .into()),
        Err(error) => Err(format!(
            "{backend} at [chain] {key}, asked for its network: {error}; refusing to serve"
        )
        .into()),
    }
}

async fn run<St: ChannelStore + Clone + 'static>(
    config: Config,
    (path, hangups): (&Path, tokio::signal::unix::Signal),
    master: paychan::bitcoin::bip32::Xpriv,
    bump: Option<paychan::bitcoin::secp256k1::SecretKey>,
    chain: Chain,
    store: St,
) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("listen {}: {e}", config.listen))?;
    let admin = match &config.admin {
        Some(admin) => Some(bind_admin(admin, config.network).await?),
        None => None,
    };
    // The price table and its description in the terms, reloaded together (SIGHUP, the
    // admin page).
    let prices = LivePrices::new(config.prices.clone());
    let reloader = Arc::new(Reloader::new(path.to_owned(), config.shadow, prices.clone()));
    let hangups = crate::prices::on_sighup(Arc::clone(&reloader), hangups);
    let paid = merchant(&config, master, bump, &chain, &store, &prices);
    let paid = paid.start(prices).await.map_err(|e| format!("the chain backend: {e}"))?;
    // The billing event log: a task of its own that reads the store, never in a request's way.
    let event_metrics = crate::events::Metrics::default();
    let events = match &config.events {
        Some(events) => {
            let (store, chain) = (store.clone(), chain.clone());
            crate::events::spawn(events, config.network, store, chain, &event_metrics)?
        }
        None => Vec::new(),
    };
    let mut layer = paid.layer().with_server_errors_credited(config.credit_server_errors);
    if config.shadow {
        tracing::warn!("shadow mode: every request is served unpaid, unlisted routes too");
        layer = layer.with_shadow_mode();
    }
    let paid = Arc::new(paid);
    let observed = observed(&config, &event_metrics);
    // With leases a charge need not reach the store: the store itself says when it is back.
    let store_watch =
        config.leases.is_some().then(|| watch_store(store.clone(), Arc::clone(&observed)));
    let app = proxy(&config, layer, &observed)?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let admin_task = admin.map(|(listener, token, settings)| {
        let settlement = Arc::clone(&paid);
        let state = Arc::new(admin::Admin {
            store,
            chain,
            master,
            observed: Arc::clone(&observed),
            settlement: Box::new(move || settlement.metrics()),
            token,
            title: format!("{} → {}", config.network, config.upstream),
            explorer: settings.explorer,
            reloader,
        });
        spawn_admin(listener, state, settings.metrics_path, stopped.clone())
    });
    tracing::info!(
        listen = %listener.local_addr()?,
        upstream = %config.upstream,
        network = %config.network,
        "paychan proxy started"
    );
    let tls = config.tls.as_ref().map(|(cert, key)| net::server_config(cert, key)).transpose()?;
    serve_connections(listener, app, tls, config.listener.clone(), config.shutdown).await;
    let _ = stop.send(true);
    if let Some(task) = admin_task {
        task.await??;
    }
    // The background tasks of this process: the store watch, the event log, SIGHUP.
    store_watch.into_iter().chain(events).chain([hangups]).for_each(|task| task.abort());
    if let Ok(paid) = Arc::try_unwrap(paid) {
        paid.stop();
    }
    tracing::info!("paychan proxy stopped: in-flight requests finished");
    Ok(())
}

/// The merchant of `config` on `store` and `chain` (negotiation, layer and settlement task),
/// its terms describing `prices` as they are when asked.
fn merchant<St: ChannelStore + Clone + 'static>(
    config: &Config,
    master: paychan::bitcoin::bip32::Xpriv,
    bump: Option<paychan::bitcoin::secp256k1::SecretKey>,
    chain: &Chain,
    store: &St,
    prices: &LivePrices,
) -> Merchant<St, Chain> {
    let described = prices.clone();
    let paid = Merchant::new(config.network, master, config.payout_script.clone(), chain.clone())
        .with_store(store.clone())
        .with_terms(config.terms.clone())
        .with_funding_policy(config.funding)
        .with_prices_from(move || described.describe())
        .with_intervals(config.tip_every, config.settle_every);
    let paid = match bump {
        Some(key) => paid.with_cpfp_key(key),
        None => paid,
    };
    // Behind a trusted front proxy every peer is the proxy: the negotiation's per-client
    // limits read the client from the X-Forwarded-For the front appended to.
    if config.listener.trust_forwarded_for {
        paid.with_client_ip_header(http::header::HeaderName::from_static("x-forwarded-for"))
    } else {
        paid
    }
}

/// What the proxy counts for the metrics and the page.
fn observed(config: &Config, events: &crate::events::Metrics) -> Arc<Observed> {
    let observed = match config.leases {
        Some(_) => Observed::new().with_leases(),
        None => Observed::new(),
    };
    Arc::new(match config.events {
        Some(_) => observed.with_events(events),
        None => observed,
    })
}

/// The proxy: the upstream behind the paywall `layer`, the path guard in front, every request
/// observed.
fn proxy<St: ChannelStore>(
    config: &Config,
    layer: paychan::server::PaywallLayer<St, LivePrices>,
    observed: &Arc<Observed>,
) -> Result<Router, Error> {
    let upstream = Arc::new(Upstream {
        client: net::client(&[])?,
        origin: config.upstream.clone(),
        proto: if config.tls.is_some() { "https" } else { "http" },
        observed: Arc::clone(observed),
        credit_server_errors: config.credit_server_errors,
        trust_forwarded_for: config.listener.trust_forwarded_for,
    });
    Ok(Router::new()
        .fallback(forward)
        .with_state(upstream)
        .layer(layer)
        .layer(axum::middleware::from_fn(guard_paths))
        .layer(axum::middleware::from_fn_with_state(Arc::clone(observed), admin::observe)))
}

/// The admin listener of `admin`, bound, with its token and settings.
async fn bind_admin(
    admin: &crate::config::Admin,
    network: paychan::bitcoin::Network,
) -> Result<(tokio::net::TcpListener, String, crate::config::Admin), Error> {
    let token = keys::read_token(&admin.token_file, network)?;
    let listener = tokio::net::TcpListener::bind(admin.listen)
        .await
        .map_err(|e| format!("admin listen {}: {e}", admin.listen))?;
    Ok((listener, token, admin.clone()))
}

/// Serves the admin listener (`state`'s page and actions, metrics at `metrics_path`) until
/// `stopped`.
fn spawn_admin<St: ChannelStore + Clone + 'static>(
    listener: tokio::net::TcpListener,
    state: Arc<admin::Admin<St>>,
    metrics_path: String,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    tracing::info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "admin listener");
    tokio::spawn(async move {
        let app = admin::router(state, &metrics_path);
        let until = async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        };
        axum::serve(listener, app).with_graceful_shutdown(until).await
    })
}

/// While requests find the store unavailable, asks it every 5 s for a small read (the pending
/// channels) and ends the outage when it answers: with leases, charges do not prove it.
fn watch_store<St: ChannelStore + 'static>(
    store: St,
    observed: Arc<Observed>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            if observed.store_is_down()
                && store.list(paychan::channel::ChannelState::Pending).await.is_ok()
            {
                observed.store_available();
            }
        }
    })
}

/// The connections each client holds (IPv4 by address, IPv6 by /64).
#[derive(Debug, Default)]
struct Clients(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

/// One connection of a client, counted until dropped.
struct Share(Arc<Clients>, std::net::IpAddr);

impl Clients {
    fn key(ip: std::net::IpAddr) -> std::net::IpAddr {
        use std::net::IpAddr;
        match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6((u128::from(v6) & (u128::MAX << 64)).into()),
            },
            v4 => v4,
        }
    }

    /// Counts a connection of `ip` within `max` a client; `None` beyond it.
    fn enter(this: &Arc<Self>, ip: std::net::IpAddr, max: Option<usize>) -> Option<Share> {
        let key = Self::key(ip);
        let mut held = this.0.lock().unwrap_or_else(|p| p.into_inner());
        let count = held.entry(key).or_default();
        if max.is_some_and(|max| *count >= max) {
            return None;
        }
        *count += 1;
        Some(Share(Arc::clone(this), key))
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut held = self.0.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = held.get_mut(&self.1) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.1);
            }
        }
    }
}

/// Serves `app` (over TLS with `tls`) until SIGTERM or Ctrl-C, then finishes the requests in
/// flight within `deadline`. HTTP/1.1 with the listener's limits: a client must send its
/// headers within `header_timeout` (an idle keep-alive connection its next ones: then it is
/// closed), at most `max_header_bytes` of them (431 beyond), and at most `max_connections`
/// connections are served at once (the others wait in the kernel's backlog), at most
/// `max_connections_per_client` of them one client's.
async fn serve_connections(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: Listener,
    deadline: Duration,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let clients = Arc::new(Clients::default());
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_header_size(limits.max_header_bytes);
    let graceful = GracefulShutdown::new();
    let stop = shutdown();
    tokio::pin!(stop);
    let mut full = false;
    loop {
        if slots.available_permits() == 0 && !full {
            tracing::warn!(
                max_connections = limits.max_connections,
                "the connection limit is reached: new connections wait"
            );
        }
        full = slots.available_permits() == 0;
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("the semaphore is never closed"),
            () = &mut stop => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stop => break,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors, say: wait instead of spinning.
                tracing::warn!(%error, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // One client's share: beyond it, its new connection is closed at once, so a client
        // holding silent connections cannot keep every other one out.
        let Some(share) = Clients::enter(&clients, peer.ip(), limits.max_connections_per_client)
        else {
            drop((tcp, slot));
            continue;
        };
        let (acceptor, app, builder) = (acceptor.clone(), app.clone(), builder.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            // The share is given back before the slot, so the next connection the slot lets in
            // never finds this one still counted.
            let _slot = (share, slot);
            serve_connection(tcp, peer, acceptor, app, builder, watcher).await;
        });
    }
    // Requests in flight finish, within the deadline.
    if tokio::time::timeout(deadline, graceful.shutdown()).await.is_err() {
        tracing::warn!("connections still open after {deadline:?}: closing them");
    }
}

/// Serves one connection from `peer` (after its TLS handshake, within 10 s, with `acceptor`)
/// until it closes or the graceful shutdown `watcher` ends it.
async fn serve_connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    app: Router,
    builder: hyper::server::conn::http1::Builder,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let app = app.map_request(move |mut request: http::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        request
    });
    let service = TowerToHyperService::new(app);
    match acceptor {
        Some(acceptor) => {
            let handshake = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp));
            let Ok(Ok(tls)) = handshake.await else { return };
            let connection = builder.serve_connection(TokioIo::new(tls), service);
            let _ = watcher.watch(connection).await;
        }
        None => {
            let connection = builder.serve_connection(TokioIo::new(tcp), service);
            let _ = watcher.watch(connection).await;
        }
    }
}

/// The path the proxy prices and forwards, or why it refuses `path` (400): anything a common
/// upstream could resolve to another route than the one the proxy priced.
///
/// Refused: dot segments and empty segments (but a trailing `/`); a `;` anywhere in the path
/// (servlet containers — Tomcat, Jetty, Spring MVC on them — strip `;params` from every segment
/// before they resolve dot segments, so `/public/..;/paid` is `/paid` to them; matrix
/// parameters are rare enough in APIs that the proxy refuses every `;` rather than parse them);
/// a backslash (a separator to IIS and some Windows servers); percent-encoded dots, slashes,
/// backslashes, `;` and control characters; any `%25` (an upstream that decodes twice sees
/// `%252e` as `.`); malformed escapes and escapes that do not decode to UTF-8 (overlong forms
/// such as `%c0%ae` are dots to old decoders).
///
/// Otherwise the path is normalised (RFC 3986 §6.2.2): escapes of unreserved characters
/// decoded (`/%70aid` is `/paid`, and priced so), the other escapes in upper case.
fn guard(path: &str) -> Result<String, &'static str> {
    let bytes = path.as_bytes();
    let mut normal = Vec::with_capacity(bytes.len());
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = |at: usize| bytes.get(at).and_then(|b| (*b as char).to_digit(16));
                let (Some(high), Some(low)) = (hex(i + 1), hex(i + 2)) else {
                    return Err("a malformed percent-encoding");
                };
                let byte = (high * 16 + low) as u8;
                match byte {
                    b'%' => return Err("double percent-encoding (%25)"),
                    b'.' | b'/' | b'\\' | b';' => {
                        return Err("a percent-encoded dot, slash, backslash or ;");
                    }
                    0..=0x1f | 0x7f => return Err("a percent-encoded control character"),
                    b if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~') => {
                        normal.push(b);
                    }
                    b => normal.extend_from_slice(format!("%{b:02X}").as_bytes()),
                }
                decoded.push(byte);
                i += 3;
            }
            b';' => return Err("a ; path parameter"),
            b'\\' => return Err("a backslash"),
            b => {
                normal.push(b);
                decoded.push(b);
                i += 1;
            }
        }
    }
    if std::str::from_utf8(&decoded).is_err() {
        return Err("a percent-encoding that is not UTF-8");
    }
    let normal = String::from_utf8(normal).map_err(|_| "a path that is not UTF-8")?;
    let segments: Vec<&str> = normal.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let odd = segments
        .iter()
        .enumerate()
        .any(|(i, segment)| matches!(*segment, "." | "..") || (segment.is_empty() && i != last));
    if odd || !normal.starts_with('/') {
        return Err("dot or empty segments");
    }
    Ok(normal)
}

/// Whether the query carries a `_method` parameter: Symfony, Laravel, Rails and Express's
/// `method-override` can run a `POST` as another method from it.
fn query_overrides(query: Option<&str>) -> bool {
    query.into_iter().flat_map(|q| q.split(['&', ';'])).any(|pair| {
        let key = pair.split('=').next().unwrap_or_default();
        // Decoded as far as any upstream decodes it (percent-encoding, twice; `+` as a space),
        // then read as PHP reads a parameter name (leading spaces trimmed; `.`, `[` and spaces
        // made `_`), compared case-insensitively: what reads `_method` is an override.
        let once = percent_decode(&key.replace('+', " "));
        let twice = percent_decode(&once);
        let php: String = twice
            .trim_start_matches(' ')
            .chars()
            .map(|c| if matches!(c, '.' | '[' | ' ') { '_' } else { c })
            .collect();
        php.eq_ignore_ascii_case("_method")
    })
}

/// Whether `method` is written in upper case, as every method a price table lists.
fn upper_case(method: &http::Method) -> bool {
    !method.as_str().bytes().any(|b| b.is_ascii_lowercase())
}

/// `text` with its `%XX` escapes decoded (bytes that are not UTF-8 become U+FFFD); a `%` not
/// followed by two hex digits is kept.
pub(crate) fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |at: usize| bytes.get(at).and_then(|b| (*b as char).to_digit(16));
        match (bytes[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (byte, _, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Refuses (400) a request whose path [`guard`] refuses or whose query overrides its method,
/// before it is priced; prices and forwards the normalised path.
async fn guard_paths(mut request: Request, next: axum::middleware::Next) -> Response {
    let refuse = |detail: String| {
        Problem::new(StatusCode::BAD_REQUEST, ProblemCode::BadRequest, detail).into_response()
    };
    // Methods are case-sensitive: `get` is not `GET` to the price table, but some upstreams
    // upper-case it (Django, Flask). Only upper-case method names pass.
    if !upper_case(request.method()) {
        return refuse(format!("the method {:?} is not upper case", request.method().as_str()));
    }
    let uri = request.uri();
    if query_overrides(uri.query()) {
        return refuse("a _method parameter in the query".to_owned());
    }
    let path = uri.path();
    let normal = match guard(path) {
        Ok(normal) if normal == path => return next.run(request).await,
        Ok(normal) => normal,
        Err(reason) => return refuse(format!("the path has {reason}")),
    };
    let path_and_query = match uri.query() {
        Some(query) => format!("{normal}?{query}"),
        None => normal,
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = path_and_query.parse().ok();
    match Uri::from_parts(parts) {
        Ok(uri) => *request.uri_mut() = uri,
        Err(_) => return refuse("a bad path".to_owned()),
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

/// Headers that make an upstream run another method or path than the one priced (ASP.NET
/// Core's `UseHttpMethodOverride`, Express's `method-override`, Laravel, IIS URL Rewrite, old
/// Symfony), and the client's own claims about its address: never forwarded.
const OVERRIDES: [&str; 7] = [
    "x-http-method-override",
    "x-method-override",
    "x-http-method",
    "x-original-url",
    "x-rewrite-url",
    "forwarded",
    "x-real-ip",
];

/// Removes the override headers and every client-written `X-Forwarded-*`, then writes the
/// proxy's own: `X-Forwarded-For` is the TCP peer (appended to the received one only when the
/// peer is a trusted front proxy that replaces it), `X-Forwarded-Host` the request's `Host`,
/// `X-Forwarded-Proto` the listener's scheme.
fn rewrite_forwarding(headers: &mut HeaderMap, peer: SocketAddr, proto: &'static str, trust: bool) {
    for name in OVERRIDES {
        headers.remove(name);
    }
    let earlier = headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .filter(|_| trust)
        .map(str::to_owned);
    let forwarded: Vec<HeaderName> =
        headers.keys().filter(|name| name.as_str().starts_with("x-forwarded-")).cloned().collect();
    for name in forwarded {
        headers.remove(name);
    }
    if let Some(host) = headers.remove(header::HOST) {
        headers.insert("x-forwarded-host", host);
    }
    let forwarded_for = match earlier {
        Some(earlier) => format!("{earlier}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
        headers.insert("x-forwarded-for", value);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static(proto));
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
    rewrite_forwarding(headers, peer, upstream.proto, upstream.trust_forwarded_for);
    let paid = parts.extensions.get::<Paid>().copied();
    match upstream.client.request(http::Request::from_parts(parts, body)).await {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            upstream.count(paid, parts.status, false);
            Response::from_parts(parts, Body::new(body))
        }
        Err(error) => {
            tracing::warn!(%error, "upstream unreachable");
            // Not connected: the request never left, nothing was served, the price goes back
            // whatever `credit_server_errors` says. Any later failure (a reset, an answer that
            // does not parse) may follow the upstream's work: a 5xx like the upstream's own.
            let unsent = error.is_connect();
            upstream.count(paid, StatusCode::BAD_GATEWAY, unsent);
            let problem = Problem::new(
                StatusCode::BAD_GATEWAY,
                ProblemCode::UpstreamUnavailable,
                "the upstream did not answer",
            );
            let mut response = problem.into_response();
            if unsent {
                response.extensions_mut().insert(ActualCost(MilliSats::ZERO));
            }
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use paychan::server::{Pricing, RoutePrices, Unlisted};

    #[test]
    fn paths_that_could_reach_another_route_are_refused() {
        for path in
            ["/", "/hello", "/a/b.txt", "/dir/", "/files/.hidden", "/a..b", "/a%20b", "/caf%C3%A9"]
        {
            assert_eq!(guard(path).as_deref(), Ok(path), "{path}");
        }
        for path in [
            "/public/../paid",
            "/public/..",
            "/./paid",
            "//paid",
            "/a//b",
            "/public/%2e%2e/paid",
            "/public/%2E%2E/paid",
            "/public/.%2e/paid",
            "/public/..%2fpaid",
            "/public/..%2Fpaid",
            "/public\\..\\paid",
            "/a/%5cb",
            // Path parameters: servlet containers strip `;…` from every segment.
            "/public/..;/paid",
            "/public/..;jsessionid=x/paid",
            "/public/.;/paid",
            "/paid;x",
            "/public/x;y=1",
            "/public/..%3b/paid",
            // Double encoding: an upstream that decodes twice sees `../`.
            "/public/..%252fpaid",
            "/public/%252e%252e/paid",
            "/public/100%25",
            // Encoded control characters, broken or overlong encodings.
            "/paid%00.txt",
            "/public/%0a",
            "/public/%c0%ae%c0%ae/paid",
            "/public/%zz",
            "/public/%2",
            "/public/%+1",
        ] {
            assert!(guard(path).is_err(), "{path}");
        }
    }

    #[test]
    fn the_normalized_path_is_priced_and_forwarded() {
        // Unreserved characters (RFC 3986 §2.3) decoded, other escapes in upper case.
        assert_eq!(guard("/%70aid").as_deref(), Ok("/paid"));
        assert_eq!(guard("/%7Euser/a%2Db%5F").as_deref(), Ok("/~user/a-b_"));
        assert_eq!(guard("/a%3fb/caf%c3%a9").as_deref(), Ok("/a%3Fb/caf%C3%A9"));
        let prices = RoutePrices::new()
            .route(http::Method::GET, "/public/{*rest}", MilliSats::ZERO)
            .route(http::Method::GET, "/paid", MilliSats::from_msat(1_000))
            .unlisted(Unlisted::Free);
        let priced = |path: &str| {
            let request = http::Request::get(guard(path).unwrap()).body(()).unwrap();
            prices.price(&request)
        };
        assert_eq!(priced("/%70aid"), Some(MilliSats::from_msat(1_000)));
        assert_eq!(priced("/%70ublic/x"), None);
    }

    #[test]
    fn secrev_path_parameters_reach_a_paid_route_through_a_free_pattern() {
        let prices = RoutePrices::new()
            .route(http::Method::GET, "/public/{*rest}", MilliSats::ZERO)
            .route(http::Method::GET, "/paid", MilliSats::from_msat(1_000))
            .unlisted(Unlisted::Refuse);
        for path in ["/public/..;/paid", "/public/..;jsessionid=x/paid"] {
            let request = http::Request::get(path).body(()).unwrap();
            let free = prices.price(&request).is_none() && !prices.refuses(&request);
            assert!(!free || guard(path).is_err(), "{path} is forwarded unpaid");
        }
    }

    /// The proxy's own 502 is given back only when the upstream was never reached: an answer
    /// that does not parse may follow the upstream's work.
    #[tokio::test]
    async fn only_an_unreachable_upstream_is_given_back() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let garbage = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let garbage_at = garbage.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = garbage.accept().await {
                let mut request = [0u8; 4096];
                let _ = tcp.read(&mut request).await;
                let _ = tcp.write_all(b"HTTP/1.1 200 OK\r\nbroken header line\r\n\r\n").await;
            }
        });
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed_at = closed.local_addr().unwrap();
        drop(closed);
        let answer = async |origin: SocketAddr| {
            let upstream = Arc::new(Upstream {
                client: net::client(&[]).unwrap(),
                origin: format!("http://{origin}"),
                proto: "http",
                observed: Arc::new(Observed::new()),
                credit_server_errors: false,
                trust_forwarded_for: false,
            });
            let app = Router::new().fallback(forward).with_state(upstream);
            let mut request = http::Request::get("/work").body(Body::empty()).unwrap();
            request
                .extensions_mut()
                .insert(ConnectInfo("127.0.0.1:1".parse::<SocketAddr>().unwrap()));
            let response = app.oneshot(request).await.unwrap();
            (response.status(), response.extensions().get::<ActualCost>().copied())
        };
        let given_back = Some(ActualCost(MilliSats::ZERO));
        assert_eq!(answer(closed_at).await, (StatusCode::BAD_GATEWAY, given_back));
        assert_eq!(answer(garbage_at).await, (StatusCode::BAD_GATEWAY, None));
    }

    #[test]
    fn a_method_override_in_the_query_is_refused() {
        for query in ["_method=DELETE", "a=1&_method=put", "%5Fmethod=DELETE", "a;_METHOD=x"] {
            assert!(query_overrides(Some(query)), "{query}");
        }
        for query in ["method=DELETE", "a_method=1", "x=_method"] {
            assert!(!query_overrides(Some(query)), "{query}");
        }
        assert!(!query_overrides(None));
    }

    /// Review 2026-12 (server side): what the upstreams the guard names read as `_method` (after percent-decoding
    /// the key, as Symfony/Laravel's PHP `$_GET`, Express's `qs` and Rack do; PHP also drops
    /// leading spaces and turns `.`, ` ` and `[` into `_` in parameter names) passes the
    /// guard: `POST /paid?_%6Dethod=GET` is priced as a POST (free under `unlisted = "free"`,
    /// or a cheaper POST route) and run as a GET by a Laravel or Symfony upstream.
    #[test]
    fn a_method_override_spelled_otherwise_is_refused() {
        for query in [
            "_%6Dethod=GET",
            "_%6dethod=GET",
            "%5F%6D%65%74%68%6F%64=GET",
            ".method=GET",
            "%2Emethod=GET",
            "[method=GET",
            "+_method=GET",
            "%20_method=GET",
        ] {
            assert!(query_overrides(Some(query)), "{query} passes the guard");
        }
    }

    /// Review 2026-12 (server side): methods are case-sensitive tokens to hyper and to the price table, but Django
    /// (`environ["REQUEST_METHOD"].upper()`, and its ASGI request alike) and Werkzeug/Flask
    /// upper-case them. `get /paid` is unlisted to the proxy: with `unlisted = "free"` (or in
    /// shadow mode) it is forwarded unpaid, as `get`, and such an upstream serves `GET /paid`.
    #[test]
    fn a_lower_case_method_is_refused_before_it_is_priced() {
        // `get /paid` is not `GET /paid` to the price table (unlisted: free here), but Django
        // and Flask upper-case it: the guard refuses it before pricing.
        let prices = RoutePrices::new()
            .route(http::Method::GET, "/paid", MilliSats::from_msat(1_000))
            .unlisted(Unlisted::Free);
        for method in ["get", "Get", "pOST"] {
            let method = http::Method::from_bytes(method.as_bytes()).unwrap();
            let request = http::Request::builder().method(method.clone()).uri("/paid");
            let request = request.body(()).unwrap();
            let free = prices.price(&request).is_none() && !prices.refuses(&request);
            assert!(!upper_case(&method) && free, "{method}: refused by the guard, not the table");
        }
        assert!(
            upper_case(&http::Method::GET)
                && upper_case(&http::Method::from_bytes(b"PURGE").unwrap())
        );
    }

    #[test]
    fn override_and_client_forwarding_headers_never_reach_the_upstream() {
        let peer: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("x-http-method-override", "DELETE"),
            ("x-method-override", "DELETE"),
            ("x-http-method", "DELETE"),
            ("x-original-url", "/paid"),
            ("x-rewrite-url", "/paid"),
            ("forwarded", "for=203.0.113.1"),
            ("x-real-ip", "203.0.113.1"),
            ("x-forwarded-for", "203.0.113.1"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-prefix", "/paid"),
            ("x-forwarded-proto", "https"),
            ("accept", "text/plain"),
        ] {
            headers.insert(name, HeaderValue::from_static(value));
        }
        let mut own = headers.clone();
        rewrite_forwarding(&mut own, peer, "http", false);
        let names: Vec<&str> = own.keys().map(HeaderName::as_str).collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert_eq!(own["accept"], "text/plain");
        assert_eq!(own["x-forwarded-for"], "192.0.2.7");
        assert_eq!(own["x-forwarded-proto"], "http");
        // Behind a front proxy that replaces X-Forwarded-For, its entry is kept.
        rewrite_forwarding(&mut headers, peer, "http", true);
        assert_eq!(headers["x-forwarded-for"], "203.0.113.1, 192.0.2.7");
        assert!(!headers.contains_key("x-http-method-override"));
        assert!(!headers.contains_key("x-forwarded-host"));
    }
}
